"""ReferenceGrant (gateway.networking.k8s.io/v1beta1): a Gateway's certificate or an HTTPRoute's backend in
another namespace is used only while a grant in that namespace allows exactly that reference; the planner,
the plane's gateway scope and Gateway API status all ask the same question (api/resources/gateway_api)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from api.resources import ResourceError, load_kinds, parse
from api.resources.gateway_api import Reference, granting
from gateway import config as gwconfig
from mgmt.gateway_scope import GatewayIndex
from mgmt.kube import translate
from mgmt.kube.gateway_status import CONTROLLER_NAME, GatewayApiObjects, GatewayStatus, kept
from mgmt.store import ConfigStore, StoredResource, stored
from tests.gateway_fixtures import reference_grant_doc, tls_material, tls_secret_doc

GW = "gateway.networking.k8s.io/v1"
TD = "cluster.local"
_, CERTS = tls_material(["bank.example", "shop.example"])


def _grant(
    name: str, ns: str, from_kind: str, from_ns: str, to_kind: str, to_name: str = "", group: str = ""
) -> dict[str, Any]:
    return reference_grant_doc(name, ns, from_kind, from_ns, to_kind, to_name, group)


def _secret(name: str, ns: str, host: str) -> dict[str, Any]:
    return tls_secret_doc(name, ns, *CERTS[host])


def _service(name: str, ns: str, address: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "addresses": [address],
            "ports": [{"port": 80, "targetPort": 8080}],
            "selector": {"app": name},
        },
    }


def _workload(name: str, ns: str, app: str, ip: str) -> dict[str, Any]:
    meta = {"name": name, "namespace": ns, "labels": {"app": app}}
    spec = {"serviceAccount": app, "node": "node-1", "ips": [ip]}
    return {"apiVersion": "ambit.io/v1", "kind": "Workload", "metadata": meta, "spec": spec}


def _base() -> list[dict[str, Any]]:
    listeners = [
        {
            "name": "shop",
            "port": 443,
            "protocol": "HTTPS",
            "tls": {"certificateRefs": [{"name": "shop-tls"}]},
        },
        {
            "name": "bank",
            "port": 8443,
            "protocol": "HTTPS",
            "tls": {"certificateRefs": [{"name": "bank-tls", "namespace": "bank"}]},
        },
    ]
    route = {
        "apiVersion": GW,
        "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"name": "edge"}],
            "rules": [
                {"matches": [{"path": {"value": "/"}}], "backendRefs": [{"name": "web", "port": 80}]},
                {
                    "matches": [{"path": {"value": "/pay"}}],
                    "backendRefs": [{"name": "pay", "namespace": "bank", "port": 80}],
                },
            ],
        },
    }
    return [
        {
            "apiVersion": GW,
            "kind": "Gateway",
            "metadata": {
                "name": "edge",
                "namespace": "shop",
                "annotations": {"ambit.io/service-account": "gw"},
            },
            "spec": {"gatewayClassName": "ambit", "listeners": listeners},
        },
        route,
        _secret("shop-tls", "shop", "shop.example"),
        _secret("bank-tls", "bank", "bank.example"),
        _secret("vault-tls", "bank", "bank.example"),
        _service("web", "shop", "10.96.0.1"),
        _service("pay", "bank", "10.96.0.2"),
        _service("ledger", "bank", "10.96.0.3"),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bank"}},
        _workload("pay-1", "bank", "pay", "10.244.2.2"),
        _workload("ledger-1", "bank", "ledger", "10.244.2.3"),
    ]


SECRET_GRANT = _grant("gw-certs", "bank", "Gateway", "shop", "Secret")
SERVICE_GRANT = _grant("routes", "bank", "HTTPRoute", "shop", "Service")
# Each allows something close to, but not, the references above.
NEAR_MISSES = [
    _grant("other-ns", "bank", "Gateway", "elsewhere", "Secret"),  # wrong from-namespace
    _grant("route-kind", "bank", "HTTPRoute", "shop", "Secret"),  # wrong from-kind for a certificate
    _grant("gw-kind", "bank", "Gateway", "shop", "Service"),  # wrong from-kind for a backend
    _grant("to-kind", "bank", "HTTPRoute", "shop", "ConfigMap"),  # wrong to-kind
    _grant("named", "bank", "Gateway", "shop", "Secret", to_name="vault-tls"),  # another name
    _grant("named-svc", "bank", "HTTPRoute", "shop", "Service", to_name="ledger"),
    _grant("group", "bank", "Gateway", "shop", "Secret", group="example.com"),  # wrong to-group
    _grant("wrong-home", "shop", "Gateway", "shop", "Secret"),  # not in the target's namespace
]


_PLANE_ONLY = (
    "Namespace",
    "Workload",
)  # the gateway takes a Service's endpoints from these (gateway/plane.py)


def _objs(docs: list[dict[str, Any]]) -> gwconfig.Objects:
    load_kinds()
    return gwconfig.from_objects(parse(d, "test") for d in docs if d["kind"] not in _PLANE_ONLY)


def test_the_parser_takes_the_crd_fields_and_refuses_the_rest() -> None:
    load_kinds()
    grant = parse(_grant("g", "bank", "Gateway", "shop", "Secret", to_name="bank-tls"), "t")
    assert (grant.from_[0].kind, grant.from_[0].namespace, grant.to[0].name) == (
        "Gateway",
        "shop",
        "bank-tls",
    )
    for bad in (
        {"from": [], "to": [{"group": "", "kind": "Secret"}]},
        {"from": [{"group": GW, "kind": "Gateway"}], "to": [{"group": "", "kind": "Secret"}]},
        {"from": [{"group": "g", "kind": "Gateway", "namespace": "a"}], "to": [{"kind": "Secret"}]},
        {
            "from": [{"group": "", "kind": "Gateway", "namespace": "a"}] * 17,
            "to": [{"group": "", "kind": "S"}],
        },
        {
            "from": [{"group": "", "kind": "Gateway", "namespace": "a"}],
            "to": [{"group": "", "kind": "S"}],
            "x": 1,
        },
    ):
        doc = _grant("g", "bank", "Gateway", "shop", "Secret") | {"spec": bad}
        with pytest.raises(ResourceError):
            parse(doc, "t")


def test_only_an_exact_grant_permits_a_reference() -> None:
    load_kinds()
    ref = Reference("Gateway", "shop", "Secret", "bank", "bank-tls")
    misses = [parse(d, "t") for d in NEAR_MISSES]
    assert granting(misses, ref) is None
    assert granting([*misses, parse(SECRET_GRANT, "t")], ref) is not None
    named = parse(_grant("n", "bank", "Gateway", "shop", "Secret", to_name="bank-tls"), "t")
    assert granting([named], ref) is named


def test_the_planner_refuses_an_ungranted_listener_alone_and_routes_to_granted_backends() -> None:
    for extra in ([], NEAR_MISSES):
        plan = gwconfig.plan(_objs(_base() + extra), "shop/edge")
        shop, bank = plan.listeners
        assert shop.certificates[0].names == ("shop.example",) and not shop.refused
        assert bank.certificates == () and "no ReferenceGrant" in bank.refused and bank.tls
        assert {e.listener_id for e in plan.entries} == {shop.listener_id}  # nothing routed via `bank`
        assert plan.backends == (("10.96.0.1:8080",),)  # /pay: no backend (answers 500)
        assert any("rule 1" in w and "bank/pay" in w and "no ReferenceGrant" in w for w in plan.warnings)
    plan = gwconfig.plan(_objs(_base() + [SECRET_GRANT, SERVICE_GRANT]), "shop/edge")
    assert plan.listeners[1].certificates[0].names == ("bank.example",) and not plan.listeners[1].refused
    assert plan.backends == (("10.96.0.1:8080",), ("10.96.0.2:8080",)) and plan.warnings == ()
    assert {e.listener_id for e in plan.entries} == {1, 2}
    # A grant for the certificate does not open the backend, and the other way round.
    plan = gwconfig.plan(_objs(_base() + [SERVICE_GRANT]), "shop/edge")
    assert plan.listeners[1].refused and len(plan.backends) == 2


def _store(tmp_path: Path, docs: list[dict[str, Any]]) -> ConfigStore:
    d = tmp_path / "c"
    d.mkdir(exist_ok=True)
    (d / "all.yaml").write_text(yaml.safe_dump_all(docs))
    store = ConfigStore(d, trust_domain=TD)
    assert store.load() == []
    return store


def test_the_scope_sends_a_granted_object_only_while_granted(tmp_path: Path) -> None:
    store = _store(tmp_path, _base() + NEAR_MISSES)
    view = GatewayIndex(store.current, TD).view("shop/edge")
    assert not [k for k in view.resources if "bank" in k]
    assert sorted((r.kind, r.target) for r in view.refusals) == [
        ("Secret", "bank/bank-tls"),
        ("Service", "bank/pay"),
    ]
    store = _store(tmp_path, _base() + NEAR_MISSES + [SECRET_GRANT, SERVICE_GRANT])
    view = GatewayIndex(store.current, TD).view("shop/edge")
    assert sorted(k for k in view.resources if "bank" in k) == [
        "Namespace/bank",
        "ReferenceGrant/bank/gw-certs",
        "ReferenceGrant/bank/routes",
        "Secret/bank/bank-tls",
        "Service/bank/pay",
        "Workload/bank/pay-1",
    ]  # not vault-tls nor ledger (nor its workload), nor the grants that allow nothing here
    assert view.refusals == ()
    # What the gateway receives is enough for its own planner to allow it.
    objs = gwconfig.from_objects(r.obj for r in view.resources.values() if r.kind not in _PLANE_ONLY)
    plan = gwconfig.plan(objs, "shop/edge")
    assert plan.listeners[1].certificates and len(plan.backends) == 2


def _status(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    load_kinds()
    raw = GatewayApiObjects()
    raw.classes["ambit"] = kept(
        {
            "apiVersion": GW,
            "kind": "GatewayClass",
            "metadata": {"name": "ambit"},
            "spec": {"controllerName": CONTROLLER_NAME},
        }
    )
    resources: dict[str, StoredResource] = {}
    for doc in (d for d in docs if d["kind"] not in _PLANE_ONLY):
        name = f"{doc['metadata']['namespace']}/{doc['metadata']['name']}"
        if doc["kind"] == "Gateway":
            raw.gateways[name] = kept(doc)
        elif doc["kind"] == "HTTPRoute":
            raw.routes[name] = kept(doc)
        res = stored(translate.policy(doc), "test")
        assert isinstance(res, StoredResource), res
        resources[str(res.key)] = res
    writes = {f"{w[2]}/{w[4]}": w[5]["status"] for w in GatewayStatus().writes(raw, resources, {})}
    listener = next(lst for lst in writes["gateways/edge"]["listeners"] if lst["name"] == "bank")
    route = writes["httproutes/web"]["parents"][0]
    return (
        {c["type"]: (c["status"], c["reason"]) for c in listener["conditions"]},
        {c["type"]: (c["status"], c["reason"]) for c in route["conditions"]},
    )


def test_status_says_ref_not_permitted_until_granted() -> None:
    listener, route = _status(_base() + NEAR_MISSES)
    assert listener["ResolvedRefs"] == ("False", "RefNotPermitted") and listener["Programmed"][0] == "False"
    assert route["ResolvedRefs"] == ("False", "RefNotPermitted")
    listener, route = _status(_base() + [SECRET_GRANT, SERVICE_GRANT])
    assert listener == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
        "Programmed": ("True", "Programmed"),
    }
    assert route["ResolvedRefs"] == ("True", "ResolvedRefs")
