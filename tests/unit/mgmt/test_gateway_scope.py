"""What a gateway may see (mgmt/gateway_scope.py); what node agents never see (Secrets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from api.resources.gateway_api import TlsSecret
from api.spiffe import SpiffeId
from mgmt.gateway_scope import GatewayIndex, service_account
from mgmt.scope import ScopeIndex
from mgmt.store import ConfigStore

TD = "cluster.local"


def _docs() -> list[dict[str, Any]]:
    def route(name: str, ns: str, backend: str, backend_ns: str = "") -> dict[str, Any]:
        ref: dict[str, Any] = {"name": backend, "port": 80}
        if backend_ns:
            ref["namespace"] = backend_ns
        return {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "parentRefs": [{"name": "edge", "namespace": "shop"}],
                "rules": [{"backendRefs": [ref]}],
            },
        }

    def secret(name: str, ns: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": ns},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": "c", "tls.key": "k"},
        }

    def service(name: str, ns: str, app: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "addresses": ["10.96.0.9"],
                "ports": [{"port": 80, "targetPort": 8080}],
                "selector": {"app": app},
            },
        }

    def workload(name: str, ns: str, app: str, ip: str) -> dict[str, Any]:
        return {
            "apiVersion": "ambit.io/v1",
            "kind": "Workload",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": app, "secret-label": "x"}},
            "spec": {"serviceAccount": app, "node": "node-1", "ips": [ip]},
        }

    listeners = [
        {"name": "a", "port": 443, "protocol": "HTTPS", "tls": {"certificateRefs": [{"name": "shop-tls"}]}},
        {
            "name": "b",
            "port": 8443,
            "protocol": "HTTPS",
            "tls": {"certificateRefs": [{"name": "bank-tls", "namespace": "bank"}]},
        },
    ]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
        {
            "apiVersion": "ambit.io/v1",
            "kind": "Node",
            "metadata": {"name": "node-1"},
            "spec": {"addresses": ["192.0.2.1"]},
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {
                "name": "edge",
                "namespace": "shop",
                "annotations": {"ambit.io/service-account": "gw"},
            },
            "spec": {"gatewayClassName": "ambit", "listeners": listeners},
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "other", "namespace": "shop"},
            "spec": {
                "gatewayClassName": "ambit",
                "listeners": [{"name": "h", "port": 80, "protocol": "HTTP"}],
            },
        },
        route("web", "shop", "web"),
        route("stray", "shop", "db", backend_ns="bank"),
        route("foreign", "bank", "web"),  # the listeners admit only routes of their own namespace
        secret("shop-tls", "shop"),
        secret("unused-tls", "shop"),
        secret("bank-tls", "bank"),
        service("web", "shop", "web"),
        service("unrelated", "shop", "other"),
        workload("web-1", "shop", "web", "10.244.1.2"),
        workload("other-1", "shop", "other", "10.244.1.3"),
        {
            "apiVersion": "ambit.io/v1",
            "kind": "WafPolicy",
            "metadata": {"name": "crs", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"}]
            },
        },
        {
            "apiVersion": "ambit.io/v1",
            "kind": "WafPolicy",
            "metadata": {"name": "theirs", "namespace": "shop"},
            "spec": {
                "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "other"}]
            },
        },
    ]


def _store(tmp_path: Path) -> ConfigStore:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "all.yaml").write_text(yaml.safe_dump_all(_docs()))
    store = ConfigStore(tmp_path / "c", trust_domain=TD)
    assert store.load() == []
    return store


def test_a_gateway_sees_what_its_gateway_references(tmp_path: Path) -> None:
    store = _store(tmp_path)
    scope = ScopeIndex(store.current)
    index = GatewayIndex(store.current, TD)
    assert index.spiffe_id("shop/edge") == SpiffeId.workload(TD, "shop", "gw")
    assert service_account(index.gateway("shop/other")) == "other-ambit"  # type: ignore[arg-type]
    assert index.served_by(SpiffeId.workload(TD, "shop", "gw")) == ["shop/edge"]
    view = index.view("shop/edge", scope.peer_resource)
    assert sorted(view.resources) == [
        "Gateway/shop/edge",
        "HTTPRoute/shop/stray",
        "HTTPRoute/shop/web",
        "Namespace/shop",
        "Secret/shop/shop-tls",
        "Service/shop/web",
        "WafPolicy/shop/crs",
        "Workload/shop/web-1",
    ]
    assert b"secret-label" not in view.resources["Workload/shop/web-1"].document  # minimal form
    assert isinstance(view.resources["Secret/shop/shop-tls"].obj, TlsSecret)
    assert sorted((r.kind, r.target) for r in view.refusals) == [
        ("Secret", "bank/bank-tls"),
        ("Service", "bank/db"),
    ]
    assert index.view("shop/missing").resources == {}


def test_node_agents_never_see_secrets(tmp_path: Path) -> None:
    store = _store(tmp_path)
    view = ScopeIndex(store.current).view("node-1", ["Workload/shop/web-1"])
    assert not [k for k in view if k.startswith("Secret/")]
    assert "Service/shop/web" in view and "Workload/shop/web-1" in view
