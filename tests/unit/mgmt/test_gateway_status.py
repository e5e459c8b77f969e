"""Gateway API status from the gateway's own plan: the reasons the API server test does not reach, and
that a status already carried is not written again."""

from __future__ import annotations

from typing import Any

from api.resources import load_kinds
from mgmt.kube import translate
from mgmt.kube.gateway_status import CONTROLLER_NAME, GatewayApiObjects, GatewayStatus, Write, kept
from mgmt.store import StoredResource, stored

GW = "gateway.networking.k8s.io/v1"


def _obj(kind: str, name: str, spec: dict[str, Any], ns: str = "shop", **status: Any) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "generation": 3}
    if ns:
        md["namespace"] = ns
    api = "v1" if kind == "Service" else GW
    return {"apiVersion": api, "kind": kind, "metadata": md, "spec": spec, "status": status}


def _listener(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "port": port, "protocol": "HTTP", **extra}


def _route(name: str, parent: dict[str, Any], hostnames: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"parentRefs": [parent], "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}
    if hostnames:
        spec["hostnames"] = hostnames
    return _obj("HTTPRoute", name, spec)


def _writes(gateway: dict[str, Any], *routes: dict[str, Any]) -> dict[str, Write]:
    load_kinds()
    raw = GatewayApiObjects()
    raw.classes["ambit"] = kept(_obj("GatewayClass", "ambit", {"controllerName": CONTROLLER_NAME}, ns=""))
    raw.gateways["shop/edge"] = kept(gateway)
    resources: dict[str, StoredResource] = {}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80, "targetPort": 8080}]},
    }
    docs = [translate.policy(gateway), translate.service(service)]
    for route in routes:
        raw.routes[f"shop/{route['metadata']['name']}"] = kept(route)
        docs.append(translate.policy(route))
    for doc in docs:
        res = stored(doc, "test")
        assert isinstance(res, StoredResource), res
        resources[str(res.key)] = res
    return {f"{w[2]}/{w[4]}": w for w in GatewayStatus().writes(raw, resources, {})}


def _conditions(entry: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in entry["conditions"]}


def _parent(writes: dict[str, Write], route: str) -> dict[str, tuple[str, str]]:
    return _conditions(writes[f"httproutes/{route}"][5]["status"]["parents"][0])


def test_listener_and_route_reasons() -> None:
    gateway = _obj(
        "Gateway",
        "edge",
        {
            "gatewayClassName": "ambit",
            "listeners": [
                _listener("a", 8080, hostname="shop.example"),
                _listener("b", 8080),
                _listener("c", 9090, allowedRoutes={"kinds": [{"kind": "GRPCRoute"}]}),
            ],
        },
    )
    writes = _writes(
        gateway,
        _route("by-section", {"name": "edge", "sectionName": "nope"}),
        _route("by-host", {"name": "edge", "sectionName": "a"}, ["other.example"]),
        _route("fine", {"name": "edge", "sectionName": "a"}, ["shop.example"]),
    )
    status = writes["gateways/edge"][5]["status"]
    # Two listeners on one port: the gateway refuses the whole config (one listener per port).
    assert _conditions(status)["Programmed"][0] == "False"
    listeners = {lst["name"]: lst for lst in status["listeners"]}
    assert _conditions(listeners["a"])["Accepted"] == ("False", "PortUnavailable")
    assert _conditions(listeners["c"])["ResolvedRefs"] == ("False", "InvalidRouteKinds")
    assert listeners["c"]["supportedKinds"] == []
    assert listeners["a"]["attachedRoutes"] == 2 and listeners["b"]["attachedRoutes"] == 0
    assert _parent(writes, "by-section")["Accepted"] == ("False", "NoMatchingParent")
    assert _parent(writes, "by-host")["Accepted"] == ("False", "NoMatchingListenerHostname")
    assert _parent(writes, "fine") == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])


def test_status_already_carried_is_not_written_and_keeps_its_transition_time() -> None:
    spec = {"gatewayClassName": "ambit", "listeners": [_listener("http", 8080)]}
    first = _writes(_obj("Gateway", "edge", spec))["gateways/edge"][5]["status"]
    again = _writes(_obj("Gateway", "edge", spec, **first))
    assert "gateways/edge" not in again  # the echo of our own write costs nothing
    # The spec changes (generation 4): rewritten, but Accepted did not flip, so its transition time stays.
    edited = _obj(
        "Gateway",
        "edge",
        spec,
        **{
            **first,
            "conditions": [{**c, "lastTransitionTime": "2020-01-01T00:00:00Z"} for c in first["conditions"]],
        },
    )
    edited["metadata"]["generation"] = 4
    status = _writes(edited)["gateways/edge"][5]["status"]
    accepted = next(c for c in status["conditions"] if c["type"] == "Accepted")
    assert accepted["observedGeneration"] == 4 and accepted["lastTransitionTime"] == "2020-01-01T00:00:00Z"


def test_other_controllers_parents_are_kept() -> None:
    theirs = {"parentRef": {"name": "other-gw"}, "controllerName": "example.com/x", "conditions": []}
    route = _route("r", {"name": "edge"})
    route["status"] = {"parents": [theirs]}
    writes = _writes(
        _obj("Gateway", "edge", {"gatewayClassName": "ambit", "listeners": [_listener("h", 80)]}), route
    )
    parents = writes["httproutes/r"][5]["status"]["parents"]
    assert parents[0] == theirs and parents[1]["controllerName"] == CONTROLLER_NAME
