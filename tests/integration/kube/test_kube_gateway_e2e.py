"""Kubernetes to the edge gateway, end to end: a Gateway and its TLS Secret applied to a real
API server reach the plane's store through the Kubernetes source, and a gateway (`ambit gateway --plane`,
in process) that joined for that Gateway serves the listener with the Secret's certificate; a renewed
Secret reaches new handshakes."""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.lab import kube
from agent.lab.apiserver import ApiServer
from api.jsonlog import AuditLog
from gateway.plane import PlaneGateway, PlaneOptions
from gateway.server import ServerOptions
from mgmt.bootstrap import BootstrapServer
from mgmt.ca import CertificateAuthority
from mgmt.gateway_scope import CurrentGateways
from mgmt.identity_service import add_identity_service
from mgmt.join_tokens import JoinTokens
from mgmt.kube.source import KubeSource
from mgmt.server import MgmtServer
from mgmt.store import ConfigStore
from tests.gateway_fixtures import _RESERVED, free_port
from tests.integration.kube.test_kube_gateway import _gateway_class, _secret
from tests.kube_fixtures import SYNC_TIMEOUT, unique
from tests.relay_fixtures import wait_until

TD = "cluster.local"
HOST = "shop.example"


def _leaf_der(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        tls.sendall(b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n")
        assert tls.recv(64).startswith(b"HTTP/1.1 ")  # the gateway answers over the Secret's TLS
    assert der is not None
    return der


def _der(secret: dict[str, Any]) -> bytes:
    pem = base64.b64decode(secret["data"]["tls.crt"])
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


@pytest.fixture
def plane(
    kube_crds: ApiServer, tmp_path: Path
) -> Iterator[tuple[ConfigStore, MgmtServer, Any, CertificateAuthority]]:
    ca = CertificateAuthority.generate_root(TD)
    store = ConfigStore(None, tmp_path / "state", trust_domain=TD)
    source = KubeSource(kube_crds.client(), store)
    source.start()
    assert source.wait_synced(SYNC_TIMEOUT)
    audit: Any = AuditLog(tmp_path / "audit.jsonl")
    gateways = CurrentGateways(lambda: store.current, TD)

    def identity_service(grpc_server: Any) -> None:
        add_identity_service(grpc_server, ca, store, audit, gateways=gateways.is_gateway)

    server = MgmtServer(
        store,
        ca,
        "127.0.0.1:0",
        TD,
        extra_services=[identity_service],
        audit=audit,
    )
    bootstrap = BootstrapServer(
        ca, JoinTokens(tmp_path / "state"), "127.0.0.1:0", audit, gateways=gateways.index
    )
    server.start()
    bootstrap.start()
    try:
        yield store, server, bootstrap, ca
    finally:
        bootstrap.stop()
        server.stop()
        source.stop()


def test_a_kubernetes_secret_is_the_certificate_the_gateway_serves(
    kube_crds: ApiServer, plane: tuple[ConfigStore, MgmtServer, Any, CertificateAuthority], tmp_path: Path
) -> None:
    store, server, bootstrap, ca = plane
    ns, cls = unique("shop"), unique("ambit")
    kube.ensure_namespace(kube_crds.client(), ns)
    port = free_port()
    secret = _secret(ns, "shop-tls", HOST)
    gateway = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "edge", "namespace": ns},
        "spec": {
            "gatewayClassName": cls,
            "addresses": [{"type": "IPAddress", "value": "127.0.0.1"}],
            "listeners": [
                {
                    "name": "https",
                    "port": port,
                    "protocol": "HTTPS",
                    "hostname": HOST,
                    "tls": {"certificateRefs": [{"kind": "Secret", "name": "shop-tls"}]},
                }
            ],
        },
    }
    docs = [_gateway_class(cls), secret, gateway]
    kube_crds.kubectl_run("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    assert wait_until(lambda: f"Secret/{ns}/shop-tls" in store.current.resources, SYNC_TIMEOUT)
    token = JoinTokens(tmp_path / "state").create_for_gateway(f"{ns}/edge", 60)
    gw = PlaneGateway(
        PlaneOptions(
            f"127.0.0.1:{server.port}", f"127.0.0.1:{bootstrap.port}", ca.bundle_pem(), f"{ns}/edge", token
        ),
        ServerOptions(audit_log=tmp_path / "gw-audit.jsonl", sockets={"https": _RESERVED.pop(port)}),
    )
    gw.start()
    try:
        assert gw.serving.wait(20), "the gateway never applied a config"
        assert _leaf_der(port) == _der(secret)
        # The certificate is renewed in Kubernetes: new handshakes get the new one.
        renewed = _secret(ns, "shop-tls", HOST)
        kube_crds.kubectl_run("apply", "-f", "-", stdin=yaml.safe_dump(renewed))
        assert wait_until(lambda: _leaf_der(port) == _der(renewed), SYNC_TIMEOUT)
    finally:
        gw.stop()
        kube_crds.kubectl_run("delete", "gatewayclass", cls)
