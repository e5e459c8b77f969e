"""Workload SVIDs for the proxy: fetched from the plane's CSR service, cached, rotated before they expire.

Each identity gets its own key, generated here and kept in memory. A certificate is rotated at about half
its lifetime (with jitter so a node's identities, and nodes, do not all renew at once); if the CA is away,
rotation retries with backoff and the current certificate keeps being served until it expires. The trust
bundle arrives with every signing answer and is also polled, so a root rotation (new root added to the
bundle before anything is signed by it) reaches this node before any peer presents a certificate from it.
The node's own certificate is renewed the same way, in place in its NodeIdentity.

When a new bundle's FIRST anchor (the plane's signing root, see mgmt.ca.CertificateAuthority.anchors) is
not the root a held certificate chains to, the signer has changed (a root rotation was activated): those
certificates are re-issued within `reissue_spread_s` (jittered so a node's identities do not all ask at
once) instead of at half life, so the old root can be dropped soon after.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from agent.identity.backoff import Backoff
from agent.identity.bootstrap import MGMT_SERVER_NAME, RETRYABLE, NodeIdentity, channel_options
from agent.identity.svid import Svid, key_and_csr
from api import ca_pb2, ca_pb2_grpc
from api.spiffe import SpiffeId, SpiffeIdError
from native import pki

log = logging.getLogger(__name__)

# How often the trust bundle is polled: a root rotation step reaches this node within one interval.
DEFAULT_BUNDLE_REFRESH_S = 30.0
# After the signing root changed, held certificates are re-issued within this many seconds (jittered).
DEFAULT_REISSUE_SPREAD_S = 5.0


class IdentityError(Exception):
    """No certificate could be obtained for an identity (refused by the plane, or the plane is away)."""


class FetchError(IdentityError):
    """One failed exchange with the CA; `retryable` when the CA is away rather than refusing."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class IdentityChange:
    kind: str  # "svid" (spiffe_id rotated or first issued) | "bundle" (trust bundle changed) | "node"
    spiffe_id: str = ""


class IdentityManager:
    def __init__(
        self,
        ca_target: str,
        node_identity: NodeIdentity,
        trust_domain: str,
        *,
        ttl: dt.timedelta | None = None,
        bundle_refresh_s: float = DEFAULT_BUNDLE_REFRESH_S,
        fetch_timeout_s: float = 10.0,
        rotate_fraction: float = 0.5,
        jitter_fraction: float = 0.1,
        server_name: str = MGMT_SERVER_NAME,
        reissue_spread_s: float = DEFAULT_REISSUE_SPREAD_S,
    ) -> None:
        self._target = ca_target
        self.node = node_identity
        self._td = trust_domain
        self._ttl_s = int(ttl.total_seconds()) if ttl else 0  # 0: the plane's default
        self._bundle_refresh_s = bundle_refresh_s
        self._fetch_timeout_s = fetch_timeout_s
        self._fraction = rotate_fraction
        self._jitter = jitter_fraction
        self._server_name = server_name
        self._reissue_spread_s = reissue_spread_s
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._svids: dict[str, Svid] = {}
        self._rotate_at: dict[str, float] = {}  # wall clock; also holds wanted-but-missing identities
        self._backoffs: dict[str, Backoff] = {}
        self._fetch_locks: dict[str, threading.Lock] = {}
        self._bundle = node_identity.trust_bundle_pem
        self._node_rotate_at = self._schedule(time.time(), node_identity.not_after.timestamp())
        self._next_bundle_poll = time.monotonic() + bundle_refresh_s
        self._channel: grpc.Channel | None = None
        self._channel_key: tuple[bytes, int] | None = None
        self._listeners: list[Callable[[IdentityChange], None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.generation = 0  # bumped on every SVID or bundle change (cheap check for cached TLS contexts)
        self.counters: dict[str, int] = {
            "issued": 0,
            "rotated": 0,
            "fetch_errors": 0,
            "bundle_updates": 0,
            "signer_changes": 0,
        }

    # Public API -----------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="identity-rotation", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=15)
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def add_listener(self, listener: Callable[[IdentityChange], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def node_identity(self) -> Svid:
        """The node's own certificate and key as one consistent snapshot (the relay's client identity; HBONE
        presents workload SVIDs)."""
        return self.node.svid()

    def trust_bundle_pem(self) -> bytes:
        with self._lock:
            return self._bundle

    def svid_for(self, spiffe_id: str | SpiffeId) -> Svid:
        """The current SVID for `spiffe_id`: cached, or fetched now (blocking) if missing or expired."""
        sid = self._check_id(str(spiffe_id))
        with self._lock:
            cached = self._svids.get(sid)
            if cached is not None and not cached.expired():
                return cached
            fetch_lock = self._fetch_locks.setdefault(sid, threading.Lock())
        with fetch_lock:  # concurrent first uses share one CSR
            with self._lock:
                cached = self._svids.get(sid)
                if cached is not None and not cached.expired():
                    return cached
            return self._fetch_blocking(sid)

    def retain(self, spiffe_ids: Iterable[str]) -> None:
        """Keep (and prefetch in the background) exactly these identities; forget the others."""
        wanted = {self._check_id(s) for s in spiffe_ids}
        with self._lock:
            for sid in list(self._rotate_at):
                if sid not in wanted:
                    self._forget(sid)
            for sid in wanted - set(self._rotate_at):
                self._rotate_at[sid] = 0.0
            self._wake.notify_all()

    def forget(self, spiffe_id: str) -> None:
        with self._lock:
            self._forget(spiffe_id)

    def rotate_now(self, spiffe_id: str | None = None) -> None:
        """Rotate one identity (or all, node included) at the next tick of the rotation thread."""
        with self._lock:
            for sid in [spiffe_id] if spiffe_id else list(self._rotate_at):
                if sid in self._rotate_at:
                    self._rotate_at[sid] = 0.0
            if spiffe_id is None:
                self._node_rotate_at = 0.0
            self._wake.notify_all()

    def refresh_bundle(self) -> bytes:
        """Ask the plane for the trust bundle now (also done every `bundle_refresh_s`)."""
        response = self._stub().TrustBundle(ca_pb2.TrustBundleRequest(), timeout=self._fetch_timeout_s)
        self._set_bundle(response.trust_bundle_pem)
        return self.trust_bundle_pem()

    def rows(self) -> list[dict[str, Any]]:
        """One row per identity for `ambit debug certs` (the node's own certificate first)."""
        now = time.time()
        with self._lock:
            node = self.node
            leaf = node.leaf
            rows = [
                _row(
                    str(node.spiffe_id),
                    leaf.serial,
                    leaf.not_before,
                    leaf.not_after,
                    leaf.issuer,
                    self._node_rotate_at - now,
                    "node",
                )
            ]
            for sid in sorted(self._rotate_at):
                svid = self._svids.get(sid)
                rotate_in = self._rotate_at[sid] - now
                if svid is None:
                    rows.append(
                        {
                            "identity": sid,
                            "serial": "",
                            "not_before": "",
                            "not_after": "",
                            "issuer": "",
                            "rotate_in_s": round(max(0.0, rotate_in), 1),
                            "state": "pending",
                        }
                    )
                    continue
                state = "expired" if svid.expired(now) else "valid"
                rows.append(
                    _row(sid, svid.serial, svid.not_before, svid.not_after, svid.issuer, rotate_in, state)
                )
            return rows

    # Internals ------------------------------------------------------------------------------------

    def _check_id(self, sid: str) -> str:
        try:
            parsed = SpiffeId.parse(sid)
        except SpiffeIdError as e:
            raise IdentityError(str(e)) from None
        if parsed.trust_domain != self._td:
            raise IdentityError(f"{sid} is outside trust domain {self._td}")
        return str(parsed)

    def _forget(self, sid: str) -> None:
        self._svids.pop(sid, None)
        self._rotate_at.pop(sid, None)
        self._backoffs.pop(sid, None)

    def _schedule(self, received_at: float, not_after: float) -> float:
        """Rotate at `fraction` of the lifetime left +- jitter (from receipt: leaves are backdated)."""
        lifetime = max(0.0, not_after - received_at)
        share = self._fraction + random.uniform(-self._jitter, self._jitter)
        return received_at + lifetime * min(max(share, 0.05), 0.95)

    def _stub(self) -> ca_pb2_grpc.IdentityStub:
        with self._lock:
            key = (self._bundle, self.node.generation)
            if self._channel is None or self._channel_key != key:
                # Credentials are fixed per channel: a new bundle or node certificate needs a new channel.
                if self._channel is not None:
                    # Calls of other threads may still be in flight on it: close it once they are done.
                    retired = threading.Timer(2 * self._fetch_timeout_s, self._channel.close)
                    retired.daemon = True
                    retired.start()
                creds = self.node.credentials(self._bundle)
                self._channel = grpc.secure_channel(
                    self._target, creds, options=channel_options(self._server_name)
                )
                self._channel_key = key
            return ca_pb2_grpc.IdentityStub(self._channel)

    def _sign(self, sid: str) -> tuple[bytes, bytes]:
        """One CSR round trip: (chain PEM, key PEM), checked to be for `sid` and our key."""
        key, csr = key_and_csr(sid)
        request = ca_pb2.SignRequest(spiffe_id=sid, csr_pem=csr, ttl_seconds=self._ttl_s)
        try:
            response = self._stub().Sign(request, timeout=self._fetch_timeout_s)
        except grpc.RpcError as e:
            self._count("fetch_errors")
            raise FetchError(f"{sid}: {e.code().name}: {e.details()}", e.code() in RETRYABLE) from None
        try:
            leaf = pki.leaf_facts(response.chain_pem)
            matches = str(SpiffeId.parse(leaf.spiffe_uri)) == sid and pki.has_key(response.chain_pem, key)
        except ValueError:
            matches = False
        if not matches:
            self._count("fetch_errors")
            raise FetchError(f"{sid}: the CA answered with a certificate for another identity or key", True)
        if response.trust_bundle_pem:
            self._set_bundle(response.trust_bundle_pem)
        return response.chain_pem, key

    def _fetch_blocking(self, sid: str) -> Svid:
        deadline = time.monotonic() + self._fetch_timeout_s
        backoff = Backoff(initial=0.2, maximum=2.0)
        while True:
            try:
                return self._install(sid, *self._sign(sid))
            except FetchError as e:
                if not e.retryable or time.monotonic() >= deadline:
                    raise IdentityError(f"no certificate for {e}") from None
                time.sleep(min(backoff.next_delay(), max(0.0, deadline - time.monotonic())))

    def _install(self, sid: str, chain_pem: bytes, key_pem_bytes: bytes) -> Svid:
        svid = Svid.from_pem(sid, chain_pem, key_pem_bytes)
        with self._lock:
            rotated = sid in self._svids
            self._svids[sid] = svid
            self._rotate_at[sid] = self._schedule(svid.received_at, svid.not_after.timestamp())
            self._backoffs.pop(sid, None)
            self.counters["rotated" if rotated else "issued"] += 1
            self.generation += 1
            self._wake.notify_all()
        log.info(
            "%s %s (serial %x, expires %s)",
            "rotated" if rotated else "issued",
            sid,
            svid.serial,
            svid.not_after.isoformat(),
        )
        self._notify(IdentityChange("svid", sid))
        return svid

    def _set_bundle(self, bundle: bytes) -> None:
        with self._lock:
            if bundle == self._bundle:
                return
            self._bundle = bundle
            self.counters["bundle_updates"] += 1
            self.generation += 1
            stale = self._reissue_if_signer_changed(bundle)
        log.info("trust bundle updated: %s", _describe_bundle(bundle))
        if stale:
            log.info(
                "the CA signs with a new root: re-issuing %d certificate(s) signed by the old one", stale
            )
        self._notify(IdentityChange("bundle"))

    def _reissue_if_signer_changed(self, bundle: bytes) -> int:
        """Schedule soon the re-issue of every certificate not chaining to the bundle's signing root.

        Called with the lock held; returns how many certificates were scheduled.
        """
        try:
            pki.chain_facts(bundle)  # its first certificate is the signing root
        except ValueError:
            return 0
        now = time.time()

        def soon() -> float:
            return now + random.uniform(0.0, self._reissue_spread_s)

        stale = 0
        for sid, svid in self._svids.items():
            if sid in self._rotate_at and not pki.top_signed_by(svid.chain_pem, bundle):
                self._rotate_at[sid] = min(self._rotate_at[sid], soon())
                stale += 1
        if not pki.top_signed_by(self.node.chain_pem, bundle):
            self._node_rotate_at = min(self._node_rotate_at, soon())
            stale += 1
        if stale:
            self.counters["signer_changes"] += 1
            self._wake.notify_all()
        return stale

    def _notify(self, change: IdentityChange) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(change)
            except Exception:  # a listener's bug must not stop rotation
                log.exception("identity listener failed on %s", change)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def _retry_later(self, sid: str | None, error: FetchError) -> None:
        with self._lock:
            backoff = self._backoffs.setdefault(sid or "", Backoff())
            delay = backoff.next_delay()
            if sid is None:
                self._node_rotate_at = time.time() + delay
            elif sid in self._rotate_at:
                self._rotate_at[sid] = time.time() + delay
        log.warning(
            "renewing %s failed (%s); keeping the current certificate, retry in %.1fs",
            sid or "node identity",
            error,
            delay,
        )

    def _due(self) -> tuple[list[str], bool, bool, float]:
        """(identities due, node due, bundle poll due, seconds until the next event)."""
        now, mono = time.time(), time.monotonic()
        due = [sid for sid, at in self._rotate_at.items() if at <= now]
        node_due = self._node_rotate_at <= now
        poll_due = mono >= self._next_bundle_poll
        waits = [at - now for at in self._rotate_at.values()] + [
            self._node_rotate_at - now,
            self._next_bundle_poll - mono,
        ]
        return due, node_due, poll_due, max(0.05, min(waits))

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                due, node_due, poll_due, wait = self._due()
                if not (due or node_due or poll_due):
                    self._wake.wait(timeout=wait)
                    continue
            self._tick(due, node_due, poll_due)

    def _tick(self, due: list[str], node_due: bool, poll_due: bool) -> None:
        if poll_due:
            self._next_bundle_poll = time.monotonic() + self._bundle_refresh_s
            try:
                self.refresh_bundle()
            except grpc.RpcError as e:
                log.warning("trust bundle poll failed: %s", e.code().name)
        if node_due:
            self._renew_node()
        for sid in due:
            try:
                chain, key = self._sign(sid)
            except FetchError as e:
                self._retry_later(sid, e)
                continue
            with self._lock:
                still_wanted = sid in self._rotate_at
            if still_wanted:
                self._install(sid, chain, key)

    def _renew_node(self) -> None:
        node = self.node
        try:
            chain, key = self._sign(str(node.spiffe_id))
            node.renew(chain, key, self.trust_bundle_pem())
        except FetchError as e:
            self._retry_later(None, e)
            return
        with self._lock:
            self._node_rotate_at = self._schedule(time.time(), node.not_after.timestamp())
            self._backoffs.pop("", None)
        log.info("renewed node identity %s (serial %x)", node.spiffe_id, node.leaf.serial)
        self._notify(IdentityChange("node", str(node.spiffe_id)))


def _describe_bundle(bundle: bytes) -> str:
    """'N root(s) trusted, signing root <subject>' (public names only) for the log."""
    try:
        roots = pki.chain_facts(bundle)
    except ValueError:
        return "unparsable bundle"
    return f"{len(roots)} root(s) trusted, signing root {roots[0].subject}"


def _row(
    sid: str,
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    issuer: str,
    rotate_in: float,
    state: str,
) -> dict[str, Any]:
    return {
        "identity": sid,
        "serial": f"{serial:x}",
        "not_before": not_before.isoformat(),
        "not_after": not_after.isoformat(),
        "issuer": issuer,
        "rotate_in_s": round(max(0.0, rotate_in), 1),
        "state": state,
    }
