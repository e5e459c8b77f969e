"""Identity end to end on loopback: a real bootstrap server (TLS), a real mTLS gRPC CSR service, agents that
join with tokens and fetch, rotate and re-fetch SVIDs; refusals carry precise gRPC statuses and are audited;
a root rotation under two live TLS connections."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import X509Svid

from agent.identity.bootstrap import JoinError, NodeIdentity, channel_options, join
from agent.identity.manager import IdentityError, IdentityManager
from agent.identity.svid import Svid, key_and_csr
from api import ca_pb2, ca_pb2_grpc
from api.spiffe import spiffe_id_of
from mgmt import ca_store
from mgmt.bootstrap import BootstrapServer
from mgmt.ca import CertificateAuthority, certs_pem, private_key_pem
from mgmt.identity_service import add_identity_service, plane_server_credentials
from mgmt.join_tokens import JoinTokens

TD = "cluster.local"
CART = f"spiffe://{TD}/ns/shop/sa/cart"  # scheduled on node-1
PAY = f"spiffe://{TD}/ns/shop/sa/pay"  # scheduled on node-2


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class AuditRecorder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, **fields})


@dataclass
class Plane:
    """The management plane's identity half: CA, token store, bootstrap and the CSR service."""

    state: Path
    ca: CertificateAuthority
    tokens: JoinTokens
    bootstrap: BootstrapServer
    audit: AuditRecorder
    workloads: dict[str, frozenset[str]]
    csr_port: int = 0
    csr_server: grpc.Server | None = None
    managers: list[IdentityManager] = field(default_factory=list)

    def identities_on_node(self, node: str) -> frozenset[str]:
        return self.workloads.get(node, frozenset())

    def start_csr(self, port: int = 0) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add_identity_service(server, self.ca, self, self.audit)
        self.csr_port = server.add_secure_port(f"127.0.0.1:{port}", plane_server_credentials(self.ca, True))
        server.start()
        self.csr_server = server

    def stop_csr(self) -> None:
        if self.csr_server is not None:
            self.csr_server.stop(0).wait()
            self.csr_server = None

    def join(self, node: str) -> NodeIdentity:
        token = self.tokens.create(node, 60)
        return join(
            f"127.0.0.1:{self.bootstrap.port}", token, node, (self.state / "ca-bundle.pem").read_bytes()
        )

    def manager(self, node: str, **kwargs: Any) -> IdentityManager:
        manager = IdentityManager(f"127.0.0.1:{self.csr_port}", self.join(node), TD, **kwargs)
        manager.start()
        self.managers.append(manager)
        return manager


@contextmanager
def running_plane(state: Path, upstream: ca_store.Upstream | None = None) -> Iterator[Plane]:
    ca = ca_store.load_or_create(state, TD, upstream)
    tokens = JoinTokens(state)
    audit = AuditRecorder()
    bootstrap = BootstrapServer(ca, tokens, "127.0.0.1:0", audit=audit)
    p = Plane(state, ca, tokens, bootstrap, audit, {"node-1": frozenset({CART}), "node-2": frozenset({PAY})})
    bootstrap.start()
    p.start_csr()
    try:
        yield p
    finally:
        for manager in p.managers:
            manager.stop()
        p.stop_csr()
        bootstrap.stop(0)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    with running_plane(tmp_path) as p:
        yield p


def _sign_raw(plane: Plane, node: NodeIdentity, spiffe_id: str, csr_pem: bytes) -> ca_pb2.SignResponse:
    creds = node.credentials()
    with grpc.secure_channel(f"127.0.0.1:{plane.csr_port}", creds, options=channel_options()) as channel:
        response: ca_pb2.SignResponse = ca_pb2_grpc.IdentityStub(channel).Sign(
            ca_pb2.SignRequest(spiffe_id=spiffe_id, csr_pem=csr_pem), timeout=10
        )
        return response


def _refused(plane: Plane, node: NodeIdentity, spiffe_id: str, csr_pem: bytes) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        _sign_raw(plane, node, spiffe_id, csr_pem)
    return err.value.code()  # type: ignore[no-any-return]


def _anchors(bundle_pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle_pem)


def _leaf(chain_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem)[0]


def test_join_then_fetch_verified_svid(plane: Plane) -> None:
    manager = plane.manager("node-1")
    node = manager.node
    assert str(spiffe_id_of(_leaf(node.chain_pem))) == f"spiffe://{TD}/node/node-1"
    svid = manager.svid_for(CART)
    assert manager.svid_for(CART) is svid  # cached
    chain = x509.load_pem_x509_certificates(svid.chain_pem)
    verified = PolicyBuilder().store(Store(_anchors(manager.trust_bundle_pem()))).build_client_verifier()
    assert [str(s.value) for s in verified.verify(chain[0], chain[1:]).subjects or []] == [CART]
    assert str(X509Svid.parse(svid.chain_pem, svid.key_pem).spiffe_id) == CART
    rows = manager.rows()
    assert [r["identity"] for r in rows] == [str(node.spiffe_id), CART]
    assert manager.node_identity().chain_pem == node.chain_pem  # the node's own identity (the relay client's)
    assert rows[1]["serial"] == f"{svid.serial:x}" and rows[1]["rotate_in_s"] > 0
    assert {"not_before", "not_after", "issuer"} <= rows[1].keys()
    assert any(e["event"] == "csr_signed" and e["spiffe_id"] == CART for e in plane.audit.events)


def test_intermediate_plane_under_external_root(tmp_path: Path) -> None:
    external = CertificateAuthority.generate_root(TD)  # the enterprise root: only its cert reaches the plane
    intermediate = external.issue_intermediate(TD)
    plug = tmp_path / "plugin"
    plug.mkdir()
    ca_store.write_file(plug / "ca-key.pem", private_key_pem(intermediate.key), 0o600)
    (plug / "ca-cert.pem").write_bytes(certs_pem([intermediate.cert]))
    (plug / "root-cert.pem").write_bytes(certs_pem([external.cert]))
    with running_plane(tmp_path / "state", ca_store.Upstream.from_dir(plug)) as p:
        manager = p.manager("node-1")  # joins with ca-bundle.pem, which holds the external root only
        assert _anchors(manager.trust_bundle_pem()) == [external.cert]
        svid = manager.svid_for(CART)
        chain = x509.load_pem_x509_certificates(svid.chain_pem)
        assert chain[1] == intermediate.cert
        verifier = PolicyBuilder().store(Store([external.cert])).build_client_verifier()
        assert verifier.verify(chain[0], chain[1:]).chain[-1] == external.cert
        assert str(X509Svid.parse(svid.chain_pem, svid.key_pem).spiffe_id) == CART


def test_refusals_have_clear_statuses_and_are_audited(plane: Plane) -> None:
    node = plane.join("node-1")
    key = ec.generate_private_key(ec.SECP256R1())
    # Another node's workload.
    assert _refused(plane, node, PAY, key_and_csr(PAY)[1]) == grpc.StatusCode.PERMISSION_DENIED
    # Extra SANs in the CSR.
    extra = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(CART), x509.DNSName("x.example")]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    assert _refused(plane, node, CART, extra) == grpc.StatusCode.INVALID_ARGUMENT
    # Malformed CSR.
    assert _refused(plane, node, CART, b"garbage") == grpc.StatusCode.INVALID_ARGUMENT
    # A SPIFFE ID that is not one.
    assert _refused(plane, node, "http://x/y", key_and_csr(CART)[1]) == grpc.StatusCode.INVALID_ARGUMENT
    codes = [(e["spiffe_id"], e["code"]) for e in plane.audit.events if e["event"] == "csr_refused"]
    assert codes == [
        (PAY, "PERMISSION_DENIED"),
        (CART, "INVALID_ARGUMENT"),
        (CART, "INVALID_ARGUMENT"),
        ("http://x/y", "INVALID_ARGUMENT"),
    ]
    # The manager surfaces a refusal as IdentityError at once (no retry loop on a permanent error).
    manager = plane.manager("node-1")
    with pytest.raises(IdentityError, match="PERMISSION_DENIED"):
        manager.svid_for(PAY)


def test_workload_certificate_cannot_request_svids(plane: Plane) -> None:
    manager = plane.manager("node-1")
    svid = manager.svid_for(CART)
    as_workload = NodeIdentity("node-1", TD, svid.chain_pem, svid.key_pem, manager.trust_bundle_pem())
    assert _refused(plane, as_workload, CART, key_and_csr(CART)[1]) == grpc.StatusCode.UNAUTHENTICATED


def test_join_token_refusals(plane: Plane) -> None:
    target = f"127.0.0.1:{plane.bootstrap.port}"
    bundle = plane.ca.bundle_pem()
    token = plane.tokens.create("node-3", 60)
    join(target, token, "node-3", bundle)
    with pytest.raises(JoinError) as reused:
        join(target, token, "node-3", bundle)
    assert reused.value.code == grpc.StatusCode.UNAUTHENTICATED
    expired = JoinTokens(plane.state, clock=lambda: time.time() - 120).create("node-4", 60)
    with pytest.raises(JoinError) as late:
        join(target, expired, "node-4", bundle)
    assert late.value.code == grpc.StatusCode.UNAUTHENTICATED and "expired" in str(late.value)
    other = plane.tokens.create("node-5", 60)
    with pytest.raises(JoinError) as wrong:
        join(target, other, "node-6", bundle)
    assert wrong.value.code == grpc.StatusCode.PERMISSION_DENIED
    kinds = [e.get("kind", e["code"]) for e in plane.audit.events if e["event"] == "join_refused"]
    assert kinds == ["used", "expired", "wrong_subject"]
    assert all(token not in str(e) for e in plane.audit.events)  # only fingerprints are recorded
    # A node that does not trust the plane's root refuses to talk to it.
    stranger = CertificateAuthority.generate_root(TD).bundle_pem()
    with pytest.raises(JoinError) as untrusted:
        join(target, plane.tokens.create("node-7", 60), "node-7", stranger, timeout=1.0)
    assert untrusted.value.code == grpc.StatusCode.UNAVAILABLE


def test_rotation_with_short_ttl(plane: Plane) -> None:
    manager = plane.manager("node-1", ttl=dt.timedelta(seconds=4))
    first = manager.svid_for(CART)
    assert first.not_after - first.not_before <= dt.timedelta(minutes=5, seconds=5)
    _wait(lambda: manager.svid_for(CART).serial != first.serial, "rotation")
    second = manager.svid_for(CART)
    assert second.key_pem != first.key_pem  # a fresh key per certificate
    assert second.not_after > first.not_after
    assert manager.counters["rotated"] >= 1


def test_retain_prefetches_and_forgets(plane: Plane) -> None:
    manager = plane.manager("node-1")
    changes: list[str] = []
    manager.add_listener(lambda change: changes.append(change.spiffe_id))
    manager.retain([CART])
    _wait(lambda: CART in changes, "background prefetch")
    assert [r["state"] for r in manager.rows() if r["identity"] == CART] == ["valid"]
    manager.retain([])
    assert [r["identity"] for r in manager.rows()] == [str(manager.node.spiffe_id)]
    with pytest.raises(IdentityError, match="outside trust domain"):
        manager.svid_for("spiffe://other.org/ns/shop/sa/cart")


def test_ca_away_keeps_current_certificate_then_recovers(plane: Plane) -> None:
    manager = plane.manager("node-1", ttl=dt.timedelta(seconds=60), rotate_fraction=0.05, jitter_fraction=0.0)
    first = manager.svid_for(CART)
    port = plane.csr_port
    plane.stop_csr()
    _wait(lambda: manager.counters["fetch_errors"] >= 1, "a failed rotation attempt")
    assert manager.svid_for(CART).serial == first.serial  # still valid: served while the CA is away
    plane.start_csr(port)
    _wait(lambda: manager.svid_for(CART).serial != first.serial, "rotation after the CA came back")


# Root rotation with live connections ---------------------------------------------------------------


class EchoServer:
    """A TLS server that answers each line with the client's SPIFFE ID; its context is re-read per accept."""

    def __init__(self, context: Callable[[], ssl.SSLContext]) -> None:
        self._context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            with self._context().wrap_socket(raw, server_side=True) as conn:
                peer = str(
                    spiffe_id_of(x509.load_der_x509_certificate(conn.getpeercert(binary_form=True) or b""))
                )
                while conn.recv(64):
                    conn.sendall(peer.encode())
        except (OSError, ValueError):
            raw.close()

    def close(self) -> None:
        self._listener.close()


def _connect(port: int, svid: Svid, bundle: bytes) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return svid.ssl_context(bundle, server=False).wrap_socket(raw)


def _roundtrip(conn: ssl.SSLSocket) -> str:
    conn.sendall(b"ping")
    return conn.recv(256).decode()


def test_root_rotation_keeps_live_connections(plane: Plane) -> None:
    server_side = plane.manager("node-1")
    client_side = plane.manager("node-2")
    server = EchoServer(
        lambda: server_side.svid_for(CART).ssl_context(server_side.trust_bundle_pem(), server=True)
    )
    try:
        old_client = client_side.svid_for(PAY)
        live = _connect(server.port, old_client, client_side.trust_bundle_pem())
        assert _roundtrip(live) == PAY
        old_root = plane.ca.cert

        # Step 1: the new root joins the bundle everywhere before it signs anything.
        new_root = plane.ca.prepare_root_rotation()
        for manager in (server_side, client_side):
            assert set(_anchors(manager.refresh_bundle())) == {old_root, new_root}
        # Step 2: the new root signs; everyone rotates (node identities too) while the old root stays trusted.
        plane.ca.activate_pending_root()
        old_server_serial = server_side.svid_for(CART).serial
        for manager in (server_side, client_side):
            manager.rotate_now()
        _wait(lambda: server_side.svid_for(CART).serial != old_server_serial, "server rotation")
        _wait(lambda: client_side.svid_for(PAY).serial != old_client.serial, "client rotation")
        new_client = client_side.svid_for(PAY)
        assert x509.load_pem_x509_certificates(new_client.chain_pem)[0].issuer == new_root.subject
        _wait(lambda: _leaf(server_side.node.chain_pem).issuer == new_root.subject, "node renewal")
        assert _roundtrip(live) == PAY  # the connection from before the rotation is still up
        fresh = _connect(server.port, new_client, client_side.trust_bundle_pem())
        assert _roundtrip(fresh) == PAY
        mixed = _connect(server.port, old_client, client_side.trust_bundle_pem())  # old cert, new server cert
        assert _roundtrip(mixed) == PAY
        mixed.close()

        # Step 3: once the old leaves are gone the old root leaves the bundle; live connections stay up.
        _wait(lambda: _leaf(client_side.node.chain_pem).issuer == new_root.subject, "node-2 renewal")
        plane.ca.drop_previous_roots()
        for manager in (server_side, client_side):
            assert _anchors(manager.refresh_bundle()) == [new_root]
        assert _roundtrip(live) == PAY and _roundtrip(fresh) == PAY
        after = _connect(server.port, new_client, client_side.trust_bundle_pem())
        assert _roundtrip(after) == PAY
        stale = _connect(server.port, old_client, client_side.trust_bundle_pem())
        with pytest.raises((ssl.SSLError, ConnectionResetError)):  # the alert, or a reset racing it
            _roundtrip(stale)  # a certificate from the dropped root is refused
        for conn in (live, fresh, after, stale):
            conn.close()
    finally:
        server.close()


def test_rotate_root_through_the_state_dir_reaches_plane_and_agents(plane: Plane) -> None:
    """The operator's path: rotate_step rewrites the files, the plane's reloader adopts them, agents follow
    by themselves (bundle poll; re-issue when the signing root changes): no rotate_now, no restart."""
    reloader = ca_store.CaReloader(plane.state, plane.ca, interval=0.05)
    reloader.start()
    fast = {"bundle_refresh_s": 0.2, "reissue_spread_s": 0.2}
    server_side = plane.manager("node-1", **fast)
    client_side = plane.manager("node-2", **fast)
    server = EchoServer(
        lambda: server_side.svid_for(CART).ssl_context(server_side.trust_bundle_pem(), server=True)
    )
    try:
        old_client = client_side.svid_for(PAY)
        live = _connect(server.port, old_client, client_side.trust_bundle_pem())
        assert _roundtrip(live) == PAY
        old_root = plane.ca.cert

        prepared, revision = ca_store.rotate_step(plane.state, "prepare")
        assert prepared.pending is not None
        new_root = prepared.pending[1]
        assert ca_store.wait_loaded(plane.state, revision, 10)
        for manager in (server_side, client_side):
            _wait(lambda m=manager: set(_anchors(m.trust_bundle_pem())) == {old_root, new_root}, "new bundle")  # type: ignore[misc]
        assert client_side.svid_for(PAY).serial == old_client.serial  # nothing re-issued yet

        _, revision = ca_store.rotate_step(plane.state, "activate")
        assert ca_store.wait_loaded(plane.state, revision, 10)
        for manager, sid in ((server_side, CART), (client_side, PAY)):
            _wait(
                lambda m=manager, s=sid: _leaf(m.svid_for(s).chain_pem).issuer == new_root.subject,
                f"{sid} re-issued",
            )  # type: ignore[misc]
            _wait(
                lambda m=manager: _leaf(m.node.chain_pem).issuer == new_root.subject,
                "node certificate re-issued",
            )  # type: ignore[misc]
            assert manager.counters["signer_changes"] >= 1, manager.counters
        assert _roundtrip(live) == PAY

        _, revision = ca_store.rotate_step(plane.state, "drop")
        assert ca_store.wait_loaded(plane.state, revision, 10)
        for manager in (server_side, client_side):
            _wait(lambda m=manager: _anchors(m.trust_bundle_pem()) == [new_root], "old root dropped")  # type: ignore[misc]
        assert _roundtrip(live) == PAY  # still up across all three steps
        fresh = _connect(server.port, client_side.svid_for(PAY), client_side.trust_bundle_pem())
        assert _roundtrip(fresh) == PAY
        for conn in (live, fresh):
            conn.close()
        # The plane itself (CSR service, serving certificate) now runs on the new root alone.
        assert _anchors(client_side.refresh_bundle()) == [new_root]
    finally:
        server.close()
        reloader.stop()
