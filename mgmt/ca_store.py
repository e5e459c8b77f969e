"""CA persistence: the CA key and certificates under the plane's state directory, or an upstream CA.

Layout of `<state_dir>` (private files 0600; a looser mode is refused, as ssh does for its keys):
  ca-key.pem, ca-cert.pem      the signing CA (root mode)
  ca-pending-key.pem/-cert.pem a root added to the bundle but not signing yet (root rotation, step 1)
  ca-previous.pem              retired roots still trusted until their leaves expire (rotation, step 2)
  ca-bundle.pem                the public trust bundle (0644): what agents are given to verify the plane
  ca-state.json                manifest written LAST by every save: revision, mode, trust domain and the
                               SHA-256 fingerprints of the signer, pending and previous roots
  ca-loaded.json               written by the running plane after it loaded a revision (rotate-root waits
                               for it)
  .ca.lock                     flock serialising writers (`ambit mgmt rotate-root`)
A running plane follows the state dir (`CaReloader`): when the manifest's revision changes it loads the
files, checks them against the manifest's fingerprints (a half-finished write is retried, never adopted)
and swaps them into its live CertificateAuthority. So root rotation is driven from outside the process by
rewriting files, with no signal or PID needed, and works the same whether the plane runs in a netns, a
container or under systemd.

Intermediate mode reads the signing CA from upstream files (Istio's plug-in layout: ca-cert.pem,
ca-key.pem, cert-chain.pem, root-cert.pem) and never copies the upstream key into the state directory.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mgmt.ca import CAError, CertificateAuthority, certs_pem, private_key_pem

log = logging.getLogger(__name__)

KEY_FILE = "ca-key.pem"
CERT_FILE = "ca-cert.pem"
PENDING_KEY_FILE = "ca-pending-key.pem"
PENDING_CERT_FILE = "ca-pending-cert.pem"
PREVIOUS_FILE = "ca-previous.pem"
BUNDLE_FILE = "ca-bundle.pem"
STATE_FILE = "ca-state.json"
LOADED_FILE = "ca-loaded.json"
LOCK_FILE = ".ca.lock"
ROTATION_STEPS = ("prepare", "activate", "drop")


@dataclass(frozen=True)
class Upstream:
    """An intermediate CA issued by an external root: its cert and key, the chain above it, the root."""

    cert: Path
    key: Path
    root: Path
    chain: Path | None = None  # certificates between the intermediate and the root, if any

    @classmethod
    def from_dir(cls, path: Path) -> Upstream:
        chain = path / "cert-chain.pem"
        return cls(
            path / "ca-cert.pem",
            path / "ca-key.pem",
            path / "root-cert.pem",
            chain if chain.exists() else None,
        )


def check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CAError(f"{path} has permissions {mode:04o}; private key files must be 0600 (chmod 600 {path})")


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomic replace with the final mode set before any byte is written (no window with a readable key)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    check_private(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise CAError(f"{path}: cannot load the private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{path}: the CA key must be an ECDSA key")
    return key


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as e:
        raise CAError(f"{path}: cannot load certificates: {e}") from None
    return certs


def _load_upstream(trust_domain: str, upstream: Upstream) -> CertificateAuthority:
    key = _load_key(upstream.key)
    cert = _load_certs(upstream.cert)[0]
    middle = _load_certs(upstream.chain) if upstream.chain else []
    # cert-chain.pem in the plug-in layout may start with the intermediate itself and end with the root.
    middle = [c for c in middle if c != cert]
    roots = _load_certs(upstream.root)
    if middle and middle[-1] == roots[0]:
        middle = middle[:-1]
    _check_trust_domain(cert, trust_domain)
    return CertificateAuthority.intermediate(trust_domain, key, cert, (*middle, roots[0]))


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON state file, or None when it is missing or unreadable (a writer is mid-way)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _manifest(ca: CertificateAuthority, revision: int) -> dict[str, Any]:
    return {
        "revision": revision,
        "mode": "root" if ca.is_root else "intermediate",
        "trust_domain": ca.trust_domain,
        "signer": fingerprint(ca.cert),
        "pending": fingerprint(ca.pending[1]) if ca.pending else None,
        "previous": [fingerprint(c) for c in ca.previous],
    }


def save(state_dir: Path, ca: CertificateAuthority) -> int:
    """Persist a root CA's signer, pending and previous roots, the public bundle, then the manifest.

    Returns the new revision. The manifest goes last, so a reader that sees a revision finds its files.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if ca.is_root:
        write_file(state_dir / KEY_FILE, private_key_pem(ca.key), 0o600)
        write_file(state_dir / CERT_FILE, certs_pem([ca.cert]), 0o644)
        if ca.pending:
            write_file(state_dir / PENDING_KEY_FILE, private_key_pem(ca.pending[0]), 0o600)
            write_file(state_dir / PENDING_CERT_FILE, certs_pem([ca.pending[1]]), 0o644)
        else:
            for name in (PENDING_KEY_FILE, PENDING_CERT_FILE):
                (state_dir / name).unlink(missing_ok=True)
        if ca.previous:
            write_file(state_dir / PREVIOUS_FILE, certs_pem(ca.previous), 0o644)
        else:
            (state_dir / PREVIOUS_FILE).unlink(missing_ok=True)
    write_file(state_dir / BUNDLE_FILE, ca.bundle_pem(), 0o644)
    previous = read_json(state_dir / STATE_FILE) or {}
    revision = int(previous.get("revision", 0)) + 1
    write_file(state_dir / STATE_FILE, json.dumps(_manifest(ca, revision)).encode(), 0o644)
    return revision


def _check_trust_domain(cert: x509.Certificate, trust_domain: str) -> None:
    """A CA made for another trust domain would sign IDs its peers do not expect: refuse to start."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return  # an upstream CA need not name a trust domain
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris and f"spiffe://{trust_domain}" not in uris:
        raise CAError(f"CA certificate is for {uris}, not spiffe://{trust_domain}")


def _load_root(state_dir: Path, trust_domain: str) -> CertificateAuthority:
    cert = _load_certs(state_dir / CERT_FILE)[0]
    _check_trust_domain(cert, trust_domain)
    ca = CertificateAuthority(trust_domain, _load_key(state_dir / KEY_FILE), cert)
    pending_key = state_dir / PENDING_KEY_FILE
    if pending_key.exists():
        ca.pending = (_load_key(pending_key), _load_certs(state_dir / PENDING_CERT_FILE)[0])
    if (state_dir / PREVIOUS_FILE).exists():
        ca.previous = tuple(_load_certs(state_dir / PREVIOUS_FILE))
    return ca


def load_or_create(
    state_dir: Path, trust_domain: str, upstream: Upstream | None = None
) -> CertificateAuthority:
    """The plane's CA: from `upstream` files (intermediate mode), from the state dir, or a new root."""
    state_dir = Path(state_dir)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with locked(state_dir):  # a rotate-root run must not interleave its files with ours
        return _load_or_create(state_dir, trust_domain, upstream)


def _load_or_create(state_dir: Path, trust_domain: str, upstream: Upstream | None) -> CertificateAuthority:
    if upstream is not None:
        ca = _load_upstream(trust_domain, upstream)
        log.info(
            "CA: intermediate %s under upstream root %s",
            ca.cert.subject.rfc4514_string(),
            ca.trust_anchor.subject.rfc4514_string(),
        )
    elif (state_dir / KEY_FILE).exists():
        ca = _load_root(state_dir, trust_domain)
        log.info("CA: loaded root %s from %s", ca.cert.subject.rfc4514_string(), state_dir)
    else:
        ca = CertificateAuthority.generate_root(trust_domain)
        log.info("CA: generated root %s in %s", ca.cert.subject.rfc4514_string(), state_dir)
    save(state_dir, ca)
    return ca


# Root rotation driven from outside the running plane ------------------------------------------------


class RotationError(CAError):
    """A rotation step asked for in the wrong state (no root CA here, or steps out of order)."""


@contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """Serialise writers of the CA state (two rotate-root runs must not interleave their files)."""
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _trust_domain_of(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise RotationError("the CA certificate names no trust domain") from None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri.removeprefix("spiffe://").rstrip("/")
    raise RotationError("the CA certificate names no trust domain")


def load_state(state_dir: Path) -> CertificateAuthority:
    """The root CA kept in a plane's state dir (for rotation); RotationError when there is none."""
    state_dir = Path(state_dir)
    manifest = read_json(state_dir / STATE_FILE)
    if not (state_dir / KEY_FILE).exists() or not (state_dir / CERT_FILE).exists():
        if manifest and manifest.get("mode") == "intermediate":
            raise RotationError(f"{state_dir}: the plane runs as an intermediate CA; rotate it upstream")
        raise RotationError(f"{state_dir}: no plane CA state here (start `ambit mgmt` with it first)")
    if manifest and manifest.get("mode") == "intermediate":
        raise RotationError(f"{state_dir}: the plane runs as an intermediate CA; rotate it upstream")
    cert = _load_certs(state_dir / CERT_FILE)[0]
    trust_domain = str(manifest["trust_domain"]) if manifest else _trust_domain_of(cert)
    return _load_root(state_dir, trust_domain)


def rotation_state(ca: CertificateAuthority) -> str:
    """'idle' (one root), 'prepared' (a new root trusted, not signing) or 'activated' (old root retired)."""
    if ca.pending is not None:
        return "prepared"
    return "activated" if ca.previous else "idle"


_NEXT = {"idle": "prepare", "prepared": "activate", "activated": "drop"}


def rotate_step(state_dir: Path, step: str) -> tuple[CertificateAuthority, int]:
    """Apply one step of a root rotation to the state dir; returns the CA and the new revision.

    Steps must come in order (prepare -> activate -> drop); anything else is refused with the next step
    to run, so a half-done rotation can be resumed but never skipped ahead.
    """
    if step not in ROTATION_STEPS:
        raise RotationError(f"unknown rotation step {step!r} (one of {', '.join(ROTATION_STEPS)})")
    state_dir = Path(state_dir)
    with locked(state_dir):
        ca = load_state(state_dir)
        state = rotation_state(ca)
        if _NEXT[state] != step:
            raise RotationError(f"cannot {step}: the rotation is {state}; the next step is {_NEXT[state]}")
        if step == "prepare":
            ca.prepare_root_rotation()
        elif step == "activate":
            ca.activate_pending_root()
        else:
            ca.drop_previous_roots()
        revision = save(state_dir, ca)
    log.info("CA: rotation step %s saved as revision %d", step, revision)
    return ca, revision


def loaded_revision(state_dir: Path) -> int:
    """The newest revision the running plane has confirmed loading (0 if none)."""
    ack = read_json(Path(state_dir) / LOADED_FILE) or {}
    try:
        return int(ack.get("revision", 0))
    except (TypeError, ValueError):
        return 0


class CaReloader:
    """Keeps a running plane's CA in step with its state dir (see the module docstring).

    Polls the manifest (a stat and a small read per `interval`); on a new revision loads and verifies the
    files and adopts them into `ca`, then confirms in ca-loaded.json. Files that do not match the manifest
    (a writer mid-way) or do not load are retried on the next poll; the CA in use is never replaced by
    anything inconsistent.
    """

    def __init__(self, state_dir: Path, ca: CertificateAuthority, interval: float = 1.0) -> None:
        self._dir = Path(state_dir)
        self._ca = ca
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        manifest = read_json(self._dir / STATE_FILE) or {}
        self.revision = int(manifest.get("revision", 0))
        self._failed_revision = -1
        self.reloads = 0

    def start(self) -> None:
        self._confirm()
        self._thread = threading.Thread(target=self._run, name="ca-reloader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception:  # never let the watcher die: the CA in use stays valid
                log.exception("CA: reloading %s failed", self._dir)

    def poll(self) -> bool:
        """Adopt a new revision if there is one; True when the CA changed."""
        manifest = read_json(self._dir / STATE_FILE)
        if not manifest or int(manifest.get("revision", 0)) == self.revision:
            return False
        revision = int(manifest["revision"])
        try:
            loaded = _load_root(self._dir, self._ca.trust_domain)
            if _manifest(loaded, revision) != manifest:
                raise CAError("files do not match the manifest yet (a write is in progress)")
            self._ca.adopt(loaded)
        except (CAError, OSError, IndexError) as e:
            if self._failed_revision != revision:  # one warning per revision, not one per poll
                log.warning("CA: revision %d not loaded yet: %s", revision, e)
                self._failed_revision = revision
            return False
        self.revision = revision
        self.reloads += 1
        log.info(
            "CA: loaded revision %d (%s): signer %s, %d root(s) trusted",
            revision,
            rotation_state(self._ca),
            self._ca.cert.subject.rfc4514_string(),
            len(self._ca.anchors()),
        )
        self._confirm()
        return True

    def _confirm(self) -> None:
        ack = {"revision": self.revision, "pid": os.getpid(), "at": time.time()}
        try:
            write_file(self._dir / LOADED_FILE, json.dumps(ack).encode(), 0o644)
        except OSError as e:
            log.warning("CA: cannot confirm revision %d: %s", self.revision, e)


def wait_loaded(state_dir: Path, revision: int, timeout: float) -> bool:
    """Wait until the running plane confirms `revision` (False on timeout: no plane is running)."""
    deadline = time.monotonic() + timeout
    while loaded_revision(state_dir) < revision:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True
