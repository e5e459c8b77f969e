"""The gateway as a client of a real management plane on loopback (gRPC, mTLS, the CA, the store watching a
config directory): it joins with a token minted for its Gateway, gets that Gateway's SVID by CSR (key in
memory), pulls its scoped config over the relay, serves it (plain and HBONE backends: the HBONE server sees
the plane-issued identity), follows config changes with a versioned ACK, NACKs a bad WafPolicy with its
reason while the old config keeps serving, renews its certificate and follows a root rotation. Refusals:
wrong, expired, reused and misbound tokens, unknown Gateways, a gateway asking for another Gateway, for a
Lookup, for another identity's certificate, and a listener Secret in another namespace without a
ReferenceGrant: each refused, counted and audited (and the Secret sent only while a grant allows it)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from agent.identity.bootstrap import JoinError, join
from agent.identity.svid import key_and_csr
from agent.relay.client import RelayClient
from api import ca_pb2, ca_pb2_grpc, relay_pb2, relay_pb2_grpc
from api.jsonlog import AuditLog
from api.spiffe import SpiffeId
from gateway import config as gwconfig
from gateway.plane import GATEWAY_TYPES, PlaneGateway, PlaneOptions, objects_of
from gateway.server import ServerOptions
from mgmt.bootstrap import BootstrapServer
from mgmt.ca import CertificateAuthority
from mgmt.gateway_scope import CurrentGateways
from mgmt.identity_service import add_identity_service
from mgmt.join_tokens import JoinTokens
from mgmt.server import SERVER_NAME, MgmtServer, issue_key_and_chain
from mgmt.store import ConfigStore
from tests.gateway_corpus import BACKEND_MARK, Backend, exchange, status_of
from tests.gateway_fixtures import _RESERVED, free_port, policy_doc
from tests.integration.gateway.test_gateway_hbone import HboneDestination
from tests.unit.native.engine_testkit import Pki, issue

TD = "cluster.local"
GATEWAY = "shop/edge"
GATEWAY_ID = f"spiffe://{TD}/ns/shop/sa/edge-ambit"  # <name>-<gatewayClassName>
DEST_ID = SpiffeId.workload(TD, "shop", "cart")
GET = b"GET %s HTTP/1.1\r\nHost: shop\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n"


def _meta(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": "shop"}
    if annotations:
        md["annotations"] = annotations
    return md


def _gateway(name: str, listeners: list[dict[str, Any]], **annotations: str) -> dict[str, Any]:
    md = _meta(name, annotations)
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": md,
        "spec": {
            "gatewayClassName": "ambit",
            "addresses": [{"type": "IPAddress", "value": "127.0.0.1"}],
            "listeners": listeners,
        },
    }


def _route(name: str, path: str, backend: str, gateway: str = "edge") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "parentRefs": [{"name": gateway}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": path}}],
                    "backendRefs": [{"name": backend, "port": 80}],
                }
            ],
        },
    }


def _service(name: str, port: int, **annotations: str) -> dict[str, Any]:
    md = _meta(name, annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": md,
        "spec": {"addresses": ["127.0.0.1"], "ports": [{"port": 80, "targetPort": port}]},
    }


@dataclass
class Plane:
    config: Path
    state: Path
    ca: CertificateAuthority
    store: ConfigStore
    server: MgmtServer
    bootstrap: BootstrapServer
    csr: Any
    audit_path: Path
    gateway_port: int
    dest: HboneDestination
    backend: Backend

    @property
    def relay_target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def bootstrap_target(self) -> str:
        return f"127.0.0.1:{self.bootstrap.port}"

    def audit(self, event: str) -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines() if self.audit_path.exists() else []
        return [r for r in map(json.loads, lines) if r["event"] == event]

    def write(self, docs: list[dict[str, Any]]) -> None:
        tmp = self.config / "gateway.yaml.tmp"
        tmp.write_text(yaml.safe_dump_all(docs))
        tmp.replace(self.config / "gateway.yaml")

    def docs(self, extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        peer = str(DEST_ID)
        return [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
            _gateway("edge", [{"name": "http", "port": self.gateway_port, "protocol": "HTTP"}]),
            _gateway("other", [{"name": "http", "port": 1, "protocol": "HTTP"}]),
            _route("web", "/web", "web"),
            _route("mesh", "/mesh", "mesh"),
            _service("web", self.backend.port),
            _service(
                "mesh",
                self.backend.port,
                **{
                    "ambit.io/gateway-upstream": "hbone",
                    "ambit.io/hbone-peer": peer,
                    "ambit.io/hbone-server": f"127.0.0.1:{self.dest.port}",
                },
            ),
            policy_doc("crs", "Gateway", "edge") | {"metadata": {"name": "crs", "namespace": "shop"}},
            *(extra or []),
        ]

    def token(self, gateway: str = GATEWAY, ttl: float = 60) -> str:
        return JoinTokens(self.state).create_for_gateway(gateway, ttl)


def _wait(pred: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    config, state = tmp_path / "config", tmp_path / "state"
    config.mkdir()
    ca = CertificateAuthority.generate_root(TD)
    dest = HboneDestination(Pki(ca, ca.bundle_pem(), issue(ca, DEST_ID), issue(ca, DEST_ID)))
    backend = Backend()
    store = ConfigStore(config, state, poll_interval=0.05, trust_domain=TD)
    audit_path = tmp_path / "plane-audit.jsonl"
    audit: Any = AuditLog(audit_path)
    gateways = CurrentGateways(lambda: store.current, TD)
    csr: list[Any] = []
    server = MgmtServer(
        store,
        ca,
        "127.0.0.1:0",
        TD,
        extra_services=[
            lambda s: csr.append(add_identity_service(s, ca, store, audit, gateways=gateways.is_gateway))
        ],
        audit=audit,
    )
    bootstrap = BootstrapServer(ca, JoinTokens(state), "127.0.0.1:0", audit, gateways=gateways.index)
    p = Plane(config, state, ca, store, server, bootstrap, None, audit_path, free_port(), dest, backend)
    p.write(p.docs())
    assert store.load() == []
    store.watch()
    server.start()
    bootstrap.start()
    p.csr = csr[0]
    yield p
    bootstrap.stop()
    server.stop()
    store.stop()
    dest.close()
    backend.close()


def _start_gateway(plane: Plane, tmp_path: Path, bundle_refresh_s: float = 30.0) -> PlaneGateway:
    options = ServerOptions(
        audit_log=tmp_path / "gw-audit.jsonl", sockets={"http": _RESERVED.pop(plane.gateway_port)}
    )
    gw = PlaneGateway(
        PlaneOptions(
            plane.relay_target,
            plane.bootstrap_target,
            plane.ca.bundle_pem(),
            GATEWAY,
            plane.token(),
            bundle_refresh_s=bundle_refresh_s,
        ),
        options,
    )
    gw.start()
    assert gw.serving.wait(20), "the gateway never applied a config"
    return gw


def _row(plane: Plane, name: str = f"gateway:{GATEWAY}") -> dict[str, Any]:
    return next((r for r in plane.server.relay.rows() if r["node"] == name), {})


def test_gateway_serves_what_the_plane_sends_with_the_plane_issued_identity(
    plane: Plane, tmp_path: Path
) -> None:
    gw = _start_gateway(plane, tmp_path)
    try:
        assert gw.identity is not None
        assert str(gw.identity.node.spiffe_id) == GATEWAY_ID
        key = gw.identity.node.key_pem
        assert all(key not in f.read_bytes() for f in tmp_path.rglob("*") if f.is_file())  # memory only
        assert plane.audit("gateway_joined")[-1]["spiffe_id"] == GATEWAY_ID
        ok = exchange(plane.gateway_port, GET % b"/web/a")
        assert status_of(ok) == 200 and BACKEND_MARK in ok
        meshed = exchange(plane.gateway_port, GET % b"/mesh/a")
        assert status_of(meshed) == 200 and BACKEND_MARK in meshed
        assert plane.dest.requests[-1][0] == GATEWAY_ID  # the HBONE server saw the plane-issued SVID
        attack = exchange(plane.gateway_port, GET % b"/web?q=1%27%20OR%201=1--")
        assert status_of(attack) == 403
        _wait(lambda: _row(plane).get("acked_version") == plane.store.version, "the first ACK")

        # A change on the plane reaches the running gateway, ACKed at the new version.
        before = plane.store.version
        plane.write(plane.docs([_route("new", "/new", "web")]))
        _wait(lambda: plane.store.version > before and gw.version == plane.store.version, "the new version")
        _wait(lambda: _row(plane).get("acked_version") == plane.store.version, "the ACK of the change")
        assert status_of(exchange(plane.gateway_port, GET % b"/new/x")) == 200

        # A WafPolicy the gateway refuses: NACKed with the reason, the running config keeps serving.
        acked = plane.store.version
        bad = policy_doc("strict", "HTTPRoute", "new", exclusions=[{"ruleIds": ["999999"]}])
        bad["metadata"]["namespace"] = "shop"
        plane.write(plane.docs([_route("new", "/new", "web"), bad]))
        _wait(lambda: _row(plane).get("state") == "NACKED", "the NACK")
        row = _row(plane)
        assert row["acked_version"] == acked and "999999" in row["last_nack"]
        assert plane.server.relay.counters()["nacks"] >= 1
        assert gw.version == acked
        assert status_of(exchange(plane.gateway_port, GET % b"/new/x")) == 200
        assert status_of(exchange(plane.gateway_port, GET % b"/web?q=1%27%20OR%201=1--")) == 403

        # Renewal at any time (here: now): a new certificate, HBONE keeps working with it.
        serial = gw.identity.node.leaf.serial
        gw.identity.rotate_now()
        _wait(lambda: gw.identity is not None and gw.identity.node.leaf.serial != serial, "renewal")
        meshed = exchange(plane.gateway_port, GET % b"/mesh/b")
        assert status_of(meshed) == 200 and plane.dest.requests[-1][0] == GATEWAY_ID
        assert plane.csr.counters().get("signed", 0) >= 1
    finally:
        gw.stop()


def test_gateway_follows_a_root_rotation(plane: Plane, tmp_path: Path) -> None:
    gw = _start_gateway(plane, tmp_path, bundle_refresh_s=0.2)
    try:
        assert gw.identity is not None
        identity = gw.identity
        plane.ca.prepare_root_rotation()
        _wait(lambda: identity.trust_bundle_pem() == plane.ca.bundle_pem(), "the new root in the bundle")
        plane.ca.activate_pending_root()
        new_root = plane.ca.anchors()[0].subject

        def reissued() -> bool:
            return identity.node.leaf.issuer == new_root.rfc4514_string()

        _wait(reissued, "the certificate re-issued under the new root")
        assert identity.counters["signer_changes"] >= 1
        # Config keeps flowing across the rotation (established streams are never re-verified).
        before = plane.store.version
        plane.write(plane.docs([_route("new", "/new", "web")]))
        _wait(lambda: plane.store.version > before and gw.version == plane.store.version, "the new version")
        assert status_of(exchange(plane.gateway_port, GET % b"/new/x")) == 200
    finally:
        gw.stop()


def _join(plane: Plane, token: str, gateway: str = GATEWAY, node: str = "") -> Any:
    return join(plane.bootstrap_target, token, node, plane.ca.bundle_pem(), timeout=5, gateway=gateway)


def _refused(plane: Plane, token: str, code: grpc.StatusCode, kind: str, **kw: str) -> None:
    with pytest.raises(JoinError) as exc:
        _join(plane, token, **kw)
    assert exc.value.code == code, exc.value
    last = plane.audit("join_refused")[-1]
    assert last.get("kind", "") == kind and token not in json.dumps(last)


def test_join_refusals_for_gateways(plane: Plane) -> None:
    token = plane.token()
    identity = _join(plane, token)
    assert str(identity.spiffe_id) == GATEWAY_ID
    _refused(plane, token, grpc.StatusCode.UNAUTHENTICATED, "used")
    _refused(plane, "not-a-token", grpc.StatusCode.UNAUTHENTICATED, "unknown")
    expired = JoinTokens(plane.state, clock=lambda: time.time() - 120).create_for_gateway(GATEWAY, 60)
    _refused(plane, expired, grpc.StatusCode.UNAUTHENTICATED, "expired")
    _refused(plane, plane.token("shop/other"), grpc.StatusCode.PERMISSION_DENIED, "wrong_subject")
    _refused(
        plane, JoinTokens(plane.state).create("node-1"), grpc.StatusCode.PERMISSION_DENIED, "wrong_subject"
    )
    _refused(
        plane,
        plane.token("shop/gone"),
        grpc.StatusCode.PERMISSION_DENIED,
        "unknown_gateway",
        gateway="shop/gone",
    )
    counts = plane.bootstrap.counters()
    assert counts["gateways_joined"] == 1
    assert counts["refused_unauthenticated"] == 3 and counts["refused_permission_denied"] == 3


def _gateway_credentials(plane: Plane, sid: str) -> grpc.ChannelCredentials:
    key, chain = issue_key_and_chain(plane.ca, SpiffeId.parse(sid))
    return grpc.ssl_channel_credentials(plane.ca.bundle_pem(), key, chain)


def _gateway_client(plane: Plane, validate: Callable[[Any], None] | None = None) -> RelayClient:
    """A relay client with the gateway's identity (no data plane behind it), started."""
    client = RelayClient(
        plane.relay_target,
        "gw",
        _gateway_credentials(plane, GATEWAY_ID),
        on_snapshot=lambda _: None,
        validate=validate,
        server_name=SERVER_NAME,
        types=GATEWAY_TYPES,
        gateway=GATEWAY,
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    client.start()
    return client


def _channel(plane: Plane, sid: str) -> grpc.Channel:
    return grpc.secure_channel(
        plane.relay_target,
        _gateway_credentials(plane, sid),
        options=[("grpc.ssl_target_name_override", SERVER_NAME)],
    )


def _subscribe(channel: grpc.Channel, **fields: Any) -> grpc.RpcError:
    stub = relay_pb2_grpc.RelayStub(channel)
    request = relay_pb2.SubscribeRequest(subscribe=relay_pb2.Subscribe(types=list(GATEWAY_TYPES), **fields))
    with pytest.raises(grpc.RpcError) as exc:
        next(iter(stub.Subscribe(iter([request]), timeout=5)))
    return exc.value


def test_a_gateway_gets_its_own_gateway_only(plane: Plane) -> None:
    with _channel(plane, GATEWAY_ID) as channel:
        other = _subscribe(channel, gateway="shop/other")
        assert other.code() == grpc.StatusCode.PERMISSION_DENIED and "does not serve" in str(other.details())
        as_node = _subscribe(channel, node="node-1")
        assert as_node.code() == grpc.StatusCode.PERMISSION_DENIED
        lookup = relay_pb2_grpc.RelayStub(channel)
        with pytest.raises(grpc.RpcError) as exc:
            lookup.Lookup(relay_pb2.LookupRequest(address="127.0.0.1"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        sign = ca_pb2_grpc.IdentityStub(channel)
        wanted = str(DEST_ID)
        with pytest.raises(grpc.RpcError) as exc:
            sign.Sign(ca_pb2.SignRequest(spiffe_id=wanted, csr_pem=key_and_csr(wanted)[1]), timeout=5)
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        own = sign.Sign(ca_pb2.SignRequest(spiffe_id=GATEWAY_ID, csr_pem=key_and_csr(GATEWAY_ID)[1]))
        assert own.chain_pem
    # A workload identity that serves no Gateway is no gateway: no config, no certificates.
    with _channel(plane, str(DEST_ID)) as channel:
        assert _subscribe(channel, gateway=GATEWAY).code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as exc:
            ca_pb2_grpc.IdentityStub(channel).TrustBundle(ca_pb2.TrustBundleRequest(), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    refused = [r["reason"] for r in plane.audit("relay_refused")]
    assert len(refused) >= 4 and plane.server.relay.counters()["refused"] >= 4
    codes = [r["code"] for r in plane.audit("csr_refused")]
    assert codes == ["PERMISSION_DENIED", "UNAUTHENTICATED"]  # another's certificate; no gateway at all


def test_a_secret_of_another_namespace_is_sent_only_while_a_reference_grant_allows_it(plane: Plane) -> None:
    import base64

    from tests.gateway_fixtures import reference_grant_doc, tls_material, tls_secret_doc

    tls = {
        "name": "https",
        "port": 8443,
        "protocol": "HTTPS",
        "tls": {"certificateRefs": [{"kind": "Secret", "name": "bank-tls", "namespace": "bank"}]},
    }
    http = {"name": "http", "port": plane.gateway_port, "protocol": "HTTP"}
    chain, key = tls_material(["bank.example"])[1]["bank.example"]
    secret = tls_secret_doc("bank-tls", "bank", chain, key)
    grant = reference_grant_doc("edge-certs", "bank", "Gateway", "shop", "Secret", to_name="bank-tls")
    near_miss = reference_grant_doc("elsewhere", "bank", "Gateway", "bank", "Secret")  # not from shop
    docs = [d for d in plane.docs() if d["metadata"]["name"] != "edge" or d["kind"] != "Gateway"]
    docs = [*docs, _gateway("edge", [http, tls]), secret]
    plane.write([*docs, near_miss])
    _wait(lambda: plane.store.current.resources.get("ReferenceGrant/bank/elsewhere"), "the store")
    plans: dict[int, gwconfig.GatewayPlan] = {}
    secrets: dict[int, list[str]] = {}

    def validate(snapshot: Any) -> None:
        secrets[snapshot.version] = [o.meta.name for o in snapshot.policies if o.kind == "Secret"]
        plans[snapshot.version] = gwconfig.plan(objects_of(snapshot), GATEWAY)

    def acked(version: int) -> bool:
        row = _row(plane)
        return row.get("acked_version") == version and version in plans

    client = _gateway_client(plane, validate)
    try:
        v1 = plane.store.current.version
        _wait(lambda: acked(v1), "the first ACK")
        # Not granted: the Secret is not sent; the listener alone is refused (the http one keeps serving).
        assert secrets[v1] == []
        https = plans[v1].listeners[1]
        assert https.refused and not https.certificates and "no ReferenceGrant" in https.refused
        assert not plans[v1].listeners[0].refused
        assert plane.server.relay.counters()["references_refused"] >= 1
        record = plane.audit("gateway_reference_refused")[-1]
        assert record["target"] == "bank/bank-tls" and record["identity"] == GATEWAY_ID
        # Granted: the next version carries the Secret and the listener serves its certificate.
        plane.write([*docs, near_miss, grant])
        _wait(lambda: plane.store.current.version > v1, "the grant in the store")
        v2 = plane.store.current.version
        _wait(lambda: acked(v2), "the granted version")
        assert secrets[v2] == ["bank-tls"]
        assert plans[v2].listeners[1].certificates[0].names == ("bank.example",)
        # Revoked: the next version no longer has it.
        plane.write([*docs, near_miss])
        _wait(lambda: plane.store.current.version > v2, "the revocation in the store")
        v3 = plane.store.current.version
        _wait(lambda: acked(v3), "the revoked version")
        assert secrets[v3] == [] and plans[v3].listeners[1].refused
    finally:
        client.stop()
    assert base64.b64encode(key).decode() not in plane.audit_path.read_text()
    assert b"PRIVATE" not in plane.audit_path.read_bytes()


def test_a_stream_ends_when_its_identity_no_longer_serves_the_gateway(plane: Plane) -> None:
    client = _gateway_client(plane)
    try:
        _wait(lambda: _row(plane).get("state") == "SYNCED", "the first ACK")
        docs = [d for d in plane.docs() if (d["kind"], d["metadata"]["name"]) != ("Gateway", "edge")]
        moved = _gateway("edge", [{"name": "http", "port": plane.gateway_port, "protocol": "HTTP"}])
        moved["metadata"]["annotations"] = {"ambit.io/service-account": "someone-else"}
        plane.write([*docs, moved])

        def refused() -> bool:
            return any("no longer serves" in r["reason"] for r in plane.audit("relay_refused"))

        _wait(refused, "the stream to be refused")
        _wait(lambda: not _row(plane).get("connected"), "the stream to end")
    finally:
        client.stop()


def test_a_first_config_that_cannot_bind_is_nacked_and_leaves_nothing_bound(
    plane: Plane, tmp_path: Path
) -> None:
    held = _RESERVED.pop(plane.gateway_port)  # the second listener's port stays taken
    first = free_port()
    _RESERVED.pop(first).close()
    listeners = [
        {"name": "a", "port": first, "protocol": "HTTP"},
        {"name": "b", "port": plane.gateway_port, "protocol": "HTTP"},
    ]
    docs = [d for d in plane.docs() if (d["kind"], d["metadata"]["name"]) != ("Gateway", "edge")]
    plane.write([*docs, _gateway("edge", listeners)])
    _wait(lambda: plane.store.current.resources["Gateway/shop/edge"].obj.listeners[0].port == first, "config")
    gw = PlaneGateway(
        PlaneOptions(
            plane.relay_target, plane.bootstrap_target, plane.ca.bundle_pem(), GATEWAY, plane.token()
        ),
        ServerOptions(),
    )
    gw.start()
    try:
        _wait(lambda: _row(plane).get("state") == "NACKED", "the NACK")
        assert "in use" in str(_row(plane)["last_nack"]) and not gw.serving.is_set()
        held.close()
        before = plane.store.version
        plane.write([*docs, _gateway("edge", listeners), _route("new", "/new", "web")])
        _wait(lambda: plane.store.version > before and gw.version == plane.store.version, "the next version")
        assert status_of(exchange(first, GET % b"/web/a")) == 200
    finally:
        gw.stop()
