"""Gateway configs written as YAML files and a running GatewayServer on loopback, for the gateway tests."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from gateway.server import GatewayServer, ServerOptions, load_plan
from tests.ports import unused_port

# Listening sockets reserved by free_port(), handed to the gateway by running_gateway: the port stays ours
# from the moment the test writes it into a config (other jobs on the machine cannot take it meanwhile).
_RESERVED: dict[int, socket.socket] = {}


def free_port() -> int:
    """A loopback port for an in-process gateway's listener, kept bound until running_gateway uses it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(1024)
    port = int(s.getsockname()[1])
    _RESERVED[port] = s
    return port


def closed_port() -> int:
    """A port nobody listens on now, for servers that bind by themselves (or for "nothing there")."""
    return unused_port()


def gateway_doc(listeners: list[dict[str, Any]], name: str = "edge") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "gatewayClassName": "ambit",
            "addresses": [{"type": "IPAddress", "value": "127.0.0.1"}],
            "listeners": listeners,
        },
    }


def route_doc(
    name: str,
    backend: str,
    *,
    hostnames: list[str] | None = None,
    matches: list[dict[str, Any]] | None = None,
    section: str = "",
) -> dict[str, Any]:
    parent: dict[str, Any] = {"name": "edge"}
    if section:
        parent["sectionName"] = section
    rule: dict[str, Any] = {"backendRefs": [{"name": backend, "port": 80}]}
    if matches:
        rule["matches"] = matches
    spec: dict[str, Any] = {"parentRefs": [parent], "rules": [rule]}
    if hostnames:
        spec["hostnames"] = hostnames
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def service_doc(name: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"addresses": ["127.0.0.1"], "ports": [{"port": 80, "targetPort": port}]},
    }


def policy_doc(name: str, kind: str, target: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ambit.io/v1",
        "kind": "WafPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": kind, "name": target}],
            **spec,
        },
    }


def write_config(directory: Path, docs: list[dict[str, Any]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gateway.yaml").write_text(yaml.safe_dump_all(docs))
    return directory


@contextlib.contextmanager
def running_gateway(directory: Path, options: ServerOptions | None = None) -> Iterator[GatewayServer]:
    plan = load_plan(directory)
    sockets = {lst.name: _RESERVED.pop(lst.port) for lst in plan.listeners if lst.port in _RESERVED}
    server = GatewayServer(plan, dataclasses.replace(options or ServerOptions(), sockets=sockets))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def tls_material(names: list[str]) -> tuple[bytes, dict[str, tuple[bytes, bytes]]]:
    """A throwaway CA and one leaf per name (DNS SAN); returns the CA PEM and name -> (chain, key)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def build(
        subject: str,
        issuer: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
        san: str = "",
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test CA")])
    ca_cert = build("gateway test CA", ca_name, ca_key, ca_key, True)
    pem = serialization.Encoding.PEM
    out = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = build(name, ca_name, key, ca_key, False, name)
        out[name] = (
            leaf.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )
    return ca_cert.public_bytes(pem), out


def reference_grant_doc(
    name: str, ns: str, from_kind: str, from_ns: str, to_kind: str, to_name: str = "", group: str = ""
) -> dict[str, Any]:
    """A ReferenceGrant in `ns` letting `from_kind`s of `from_ns` refer to `to_kind` (group `group`, "" core)
    objects of `ns`, or to the one named `to_name`."""
    to: dict[str, Any] = {"group": group, "kind": to_kind}
    if to_name:
        to["name"] = to_name
    return {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "from": [{"group": "gateway.networking.k8s.io", "kind": from_kind, "namespace": from_ns}],
            "to": [to],
        },
    }


def tls_secret_doc(name: str, ns: str, chain: bytes, key: bytes) -> dict[str, Any]:
    import base64

    data = {"tls.crt": base64.b64encode(chain).decode(), "tls.key": base64.b64encode(key).decode()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "type": "kubernetes.io/tls",
        "data": data,
    }
