"""Gateway configs written as YAML files and a running GatewayServer on loopback, for the gateway tests."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from gateway.server import GatewayServer, ServerOptions, load_plan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    server = GatewayServer(load_plan(directory), options)
    server.start()
    try:
        yield server
    finally:
        server.stop()
