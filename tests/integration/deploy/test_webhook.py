"""The admission webhook called as the API server calls it: AdmissionReview v1, HTTPS, the mesh CA's cert."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509

from mgmt.ca import CertificateAuthority
from mgmt.webhook import MAX_BODY_BYTES, MAX_INFLIGHT, WebhookServer

SERVICE_DNS = "ambit-mgmt.ambit-system.svc"
REGO_OK = 'package ambit\ndefault authz := false\nauthz if input.source_namespace == "prod"'


@pytest.fixture
def webhook() -> Iterator[tuple[WebhookServer, CertificateAuthority]]:
    ca = CertificateAuthority.generate_root("cluster.local")
    server = WebhookServer(ca, "cluster.local", "127.0.0.1:0", (SERVICE_DNS,))
    server.start()
    try:
        yield server, ca
    finally:
        server.stop()


def _tls(ca: CertificateAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca.bundle_pem().decode())


def _post(
    port: int, ca: CertificateAuthority, body: bytes, path: str = "/validate", length: int | None = None
) -> tuple[int, Any]:
    """POST over TLS to 127.0.0.1, verifying the Service's DNS name as the API server does.

    With `length`, only the headers are sent, announcing that many bytes."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sock = _tls(ca).wrap_socket(sock, server_hostname=SERVICE_DNS)
    try:
        if length is None:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
        else:
            conn.putrequest("POST", path)
            conn.putheader("Content-Length", str(length))
            conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _review(obj: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    md = obj["metadata"]
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": obj["apiVersion"].split("/")[0], "version": "v1", "kind": obj["kind"]},
            "name": md["name"],
            "namespace": md.get("namespace", ""),
            "operation": operation,
            "userInfo": {"username": "tester"},
            "object": obj,
            "dryRun": False,
        },
    }


def _authz(spec: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    # As the API server sends it: server-owned metadata included.
    return {
        "apiVersion": f"security.istio.io/{version}",
        "kind": "AuthorizationPolicy",
        "metadata": {
            "name": "p",
            "namespace": "prod",
            "uid": str(uuid.uuid4()),
            "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": spec,
    }


def _verdict(port: int, ca: CertificateAuthority, obj: dict[str, Any]) -> dict[str, Any]:
    review = _review(obj)
    status, doc = _post(port, ca, json.dumps(review).encode())
    assert status == 200
    assert doc["apiVersion"] == "admission.k8s.io/v1" and doc["kind"] == "AdmissionReview"
    assert doc["response"]["uid"] == review["request"]["uid"]
    return dict(doc["response"])


def _rego(module: str) -> dict[str, Any]:
    return {
        "apiVersion": "ambit.io/v1",
        "kind": "RegoPolicy",
        "metadata": {"name": "r", "namespace": "prod"},
        "spec": {"module": module},
    }


def test_valid_objects_are_allowed(webhook: tuple[WebhookServer, CertificateAuthority]) -> None:
    server, ca = webhook
    for version in ("v1", "v1beta1"):
        spec = {
            "action": "DENY",
            "selector": {"matchLabels": {"app.kubernetes.io/name": "cart"}},
            "rules": [
                {
                    "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web", "*/sa/admin"]}}],
                    "to": [{"operation": {"ports": ["8080"]}}],
                }
            ],
        }
        assert _verdict(server.port, ca, _authz(spec, version))["allowed"] is True
    assert _verdict(server.port, ca, _rego(REGO_OK))["allowed"] is True
    assert server.counters()["allowed"] == 3


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (_rego("package ambit\nauthz := input.x +"), "module does not compile"),
        (_rego("package ambit\nauthz := ab sent("), "module does not compile"),
        (
            _authz({"rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/a/sa/b"]}}]}]}),
            "without 'spiffe://'",
        ),
        (
            _authz({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a"]}}]}]}),
            "<trust-domain>/ns/<namespace>/sa/<service-account>",
        ),
        (_authz({"rules": [{"from": [{"source": {"namespaces": ["Prod_1"]}}]}]}), "namespace name"),
        (_authz({"rules": [{"when": [{"key": "source.principal", "values": ["nope"]}]}]}), "when[0]"),
        (_authz({"selector": {"matchLabels": {"bad key!": "x"}}}), "label key"),
        (_authz({"selector": {"matchLabels": {"app": "-bad-"}}}), "label value"),
        (_authz({"action": "CUSTOM", "provider": {"name": "ext"}}), "CUSTOM action without rules"),
    ],
)
def test_invalid_objects_are_refused_with_the_reason(
    webhook: tuple[WebhookServer, CertificateAuthority], obj: dict[str, Any], reason: str
) -> None:
    server, ca = webhook
    response = _verdict(server.port, ca, obj)
    assert response["allowed"] is False
    assert response["status"]["code"] == 422
    assert reason in response["status"]["message"]
    assert server.counters()["rejected"] == 1


def test_what_the_node_enforces_differently_comes_back_as_warnings(
    webhook: tuple[WebhookServer, CertificateAuthority],
) -> None:
    server, ca = webhook
    response = _verdict(server.port, ca, _authz({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}))
    assert response["allowed"] is True
    assert response["warnings"] and any("methods" in w for w in response["warnings"])


def test_delete_is_allowed_and_bad_requests_are_http_errors(
    webhook: tuple[WebhookServer, CertificateAuthority],
) -> None:
    server, ca = webhook
    review = _review(_rego("not rego at all"), operation="DELETE")
    status, doc = _post(server.port, ca, json.dumps(review).encode())
    assert status == 200 and doc["response"]["allowed"] is True
    assert _post(server.port, ca, b"{not json")[0] == 400
    assert _post(server.port, ca, json.dumps({"kind": "AdmissionReview"}).encode())[0] == 400
    assert _post(server.port, ca, b"{}", path="/mutate")[0] == 404
    assert _post(server.port, ca, b"", length=MAX_BODY_BYTES + 1)[0] == 413
    assert server.counters()["bad_requests"] == 3


def test_serving_certificate_names_the_service_and_follows_ca_rotation(
    webhook: tuple[WebhookServer, CertificateAuthority],
) -> None:
    server, ca = webhook
    with (
        socket.create_connection(("127.0.0.1", server.port)) as sock,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        _tls(ca).wrap_socket(sock, server_hostname="other.ambit-system.svc")
    old_root = ca.cert.subject
    ca.prepare_root_rotation()
    ca.activate_pending_root()
    sock = socket.create_connection(("127.0.0.1", server.port))
    with _tls(ca).wrap_socket(sock, server_hostname=SERVICE_DNS) as tls:
        leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
    assert leaf.issuer == ca.cert.subject != old_root
    assert _verdict(server.port, ca, _rego(REGO_OK))["allowed"] is True


def test_concurrent_connections_are_bounded(webhook: tuple[WebhookServer, CertificateAuthority]) -> None:
    server, ca = webhook
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(MAX_INFLIGHT)]
    try:
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        assert extra.recv(1) == b""  # closed at once: every slot is held by an idle client
        extra.close()
        assert server.counters()["overloaded"] >= 1
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10  # the idle clients' handler threads see EOF and free their slots
    while True:
        try:
            assert _verdict(server.port, ca, _rego(REGO_OK))["allowed"] is True
            break
        except (ConnectionError, ssl.SSLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_second_mesh_config_is_refused() -> None:
    ca = CertificateAuthority.generate_root("cluster.local")
    server = WebhookServer(ca, "cluster.local", "127.0.0.1:0", (SERVICE_DNS,), lambda: ["mesh"])
    server.start()
    try:

        def mesh(name: str) -> dict[str, Any]:
            return {"apiVersion": "ambit.io/v1", "kind": "MeshConfig", "metadata": {"name": name}, "spec": {}}

        assert _verdict(server.port, ca, mesh("mesh"))["allowed"] is True  # an edit of the one in force
        second = _verdict(server.port, ca, mesh("other"))
        assert second["allowed"] is False and "MeshConfig mesh already holds" in second["status"]["message"]
    finally:
        server.stop()
