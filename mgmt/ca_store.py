"""CA persistence: the CA key and certificates under the plane's state directory, or an upstream CA.

Layout of `<state_dir>` (private files 0600; a looser mode is refused, as ssh does for its keys):
  ca-key.pem, ca-cert.pem      the signing CA (root mode)
  ca-pending-key.pem/-cert.pem a root added to the bundle but not signing yet (root rotation, step 1)
  ca-previous.pem              retired roots still trusted until their leaves expire (rotation, step 2)
  ca-bundle.pem                the public trust bundle (0644): what agents are given to verify the plane
Intermediate mode reads the signing CA from upstream files (Istio's plug-in layout: ca-cert.pem,
ca-key.pem, cert-chain.pem, root-cert.pem) and never copies the upstream key into the state directory.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mgmt.ca import CAError, CertificateAuthority, certs_pem, private_key_pem

log = logging.getLogger(__name__)

KEY_FILE = "ca-key.pem"
CERT_FILE = "ca-cert.pem"
PENDING_KEY_FILE = "ca-pending-key.pem"
PENDING_CERT_FILE = "ca-pending-cert.pem"
PREVIOUS_FILE = "ca-previous.pem"
BUNDLE_FILE = "ca-bundle.pem"


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


def save(state_dir: Path, ca: CertificateAuthority) -> None:
    """Persist a root CA's signer, pending and previous roots, and the public bundle."""
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
