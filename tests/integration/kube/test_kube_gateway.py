"""The edge gateway's configuration from a real API server: Gateway API objects, WafPolicy and listener
Secrets in the plane's store, following edits and deletes; the status conditions the plane writes; the
mesh's ServiceCIDRs reaching a node.

The Gateway API CRDs are the sigs.k8s.io/gateway-api release's own (scripts/gateway-api-crds.sh); each test
uses its own namespace and its own GatewayClass.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Mapping
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.lab import kube
from gateway import config as gwconfig
from mgmt.kube.gateway_status import CONTROLLER_NAME
from mgmt.store import ConfigSnapshot
from tests.gateway_fixtures import reference_grant_doc
from tests.kube_fixtures import SYNC_TIMEOUT, KubePlane, unique
from tests.relay_fixtures import relay_client, wait_until

GW = "gateway.networking.k8s.io/v1"


def _cert(host: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _secret(ns: str, name: str, host: str) -> dict[str, Any]:
    crt, key = _cert(host)
    data = {"tls.crt": base64.b64encode(crt).decode(), "tls.key": base64.b64encode(key).decode()}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": ns},
        "data": data,
    }


def _apply(plane: KubePlane, *docs: Mapping[str, Any]) -> None:
    plane.api.kubectl_run("apply", "-f", "-", stdin=yaml.safe_dump_all(list(docs)))


def _gateway_class(name: str, controller: str = CONTROLLER_NAME) -> dict[str, Any]:
    return {
        "apiVersion": GW,
        "kind": "GatewayClass",
        "metadata": {"name": name},
        "spec": {"controllerName": controller},
    }


def _gateway(ns: str, cls: str, secret: str, name: str = "edge") -> dict[str, Any]:
    return {
        "apiVersion": GW,
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "gatewayClassName": cls,
            "listeners": [
                {
                    "name": "https",
                    "port": 8443,
                    "protocol": "HTTPS",
                    "hostname": "shop.example",
                    "tls": {"certificateRefs": [{"kind": "Secret", "name": secret}]},
                },
                {"name": "http", "port": 8080, "protocol": "HTTP"},
            ],
        },
    }


def _route(
    ns: str, name: str, backend: Mapping[str, Any], parent_ns: str = "", path: str = "/"
) -> dict[str, Any]:
    parent: dict[str, Any] = {"name": "edge"}
    if parent_ns:
        parent["namespace"] = parent_ns
    return {
        "apiVersion": GW,
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "parentRefs": [parent],
            "rules": [
                {"matches": [{"path": {"type": "PathPrefix", "value": path}}], "backendRefs": [backend]}
            ],
        },
    }


def _waf(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": name, "namespace": ns}
    return {"apiVersion": "ambit.io/v1", "kind": "WafPolicy", "metadata": meta, "spec": spec}


def _service(plane: KubePlane, ns: str, name: str = "web") -> None:
    from kubernetes import client

    body = kube.service_body(ns, name, "", [(80, 8080)], {"app": name})
    client.CoreV1Api(plane.api.client()).create_namespaced_service(ns, body)


def _held(plane: KubePlane, key: str) -> Any:
    res = plane.store.current.resources.get(key)
    return res.obj if res is not None else None


def _setup(plane: KubePlane) -> tuple[str, str]:
    ns = unique("gw")
    cls = unique("ambit")
    kube.ensure_namespace(plane.api.client(), ns)
    _apply(plane, _gateway_class(cls))
    return ns, cls


def test_gateway_objects_and_the_referenced_secret_follow_the_api(kube_plane: KubePlane) -> None:
    ns, cls = _setup(kube_plane)
    _service(kube_plane, ns)
    shop, other = _secret(ns, "shop-tls", "shop.example"), _secret(ns, "other-tls", "shop.example")
    waf = _waf(
        ns,
        "strict",
        {
            "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"}],
            "paranoiaLevel": 2,
        },
    )
    backend = {"name": "web", "port": 80}
    _apply(kube_plane, shop, other, _gateway(ns, cls, "shop-tls"), _route(ns, "shop", backend), waf)
    keys = [f"Gateway/{ns}/edge", f"HTTPRoute/{ns}/shop", f"WafPolicy/{ns}/strict", f"Secret/{ns}/shop-tls"]
    assert wait_until(lambda: all(_held(kube_plane, k) for k in keys), SYNC_TIMEOUT), (
        kube_plane.source.counters()
    )
    gw = _held(kube_plane, f"Gateway/{ns}/edge")
    assert [(lst.name, lst.port, lst.protocol) for lst in gw.listeners] == [
        ("https", 8443, "HTTPS"),
        ("http", 8080, "HTTP"),
    ]
    assert _held(kube_plane, f"WafPolicy/{ns}/strict").paranoia_level == 2
    secret = _held(kube_plane, f"Secret/{ns}/shop-tls")
    assert secret.certificate_pem == base64.b64decode(shop["data"]["tls.crt"])
    assert secret.key_pem == base64.b64decode(shop["data"]["tls.key"])
    assert _held(kube_plane, f"Secret/{ns}/other-tls") is None  # a TLS Secret no listener references
    # What the store holds is what the gateway builds its tables from.
    objs = gwconfig.from_objects(
        r.obj
        for r in kube_plane.store.current.resources.values()
        if r.kind in ("Gateway", "HTTPRoute", "WafPolicy", "Secret", "Service") and r.key.namespace == ns
    )
    plan = gwconfig.plan(objs, f"{ns}/edge")
    assert plan.routes == (f"{ns}/shop",) and plan.listeners[0].certificates[0].names == ("shop.example",)
    assert {e.policy.meta.name for e in plan.entries if e.policy} == {"strict"}

    # Edits follow: the route's path, and the listener now pointing at the other Secret (which the plane
    # dropped on arrival, so it is read again) while the first one is let go. No version in between has
    # the listener without its certificate (the gateway would refuse it).
    incomplete: list[int] = []

    def check(snap: ConfigSnapshot) -> None:
        res = snap.resources.get(f"Gateway/{ns}/edge")
        refs = {r.name for lst in res.obj.listeners for r in lst.certificate_refs} if res else set()
        if any(f"Secret/{ns}/{name}" not in snap.resources for name in refs):
            incomplete.append(snap.version)

    relists = kube_plane.source.counters()["secret_relists"]
    kube_plane.store.add_listener(check)
    _apply(kube_plane, _route(ns, "shop", backend, path="/api"), _gateway(ns, cls, "other-tls"))

    def edited() -> bool:
        route = _held(kube_plane, f"HTTPRoute/{ns}/shop")
        return (
            route is not None
            and route.rules[0].matches[0].path == "/api"
            and _held(kube_plane, f"Secret/{ns}/other-tls") is not None
            and _held(kube_plane, f"Secret/{ns}/shop-tls") is None
        )

    assert wait_until(edited, SYNC_TIMEOUT), kube_plane.source.counters()
    kube_plane.store.remove_listener(check)
    assert incomplete == []
    assert kube_plane.source.counters()["secret_relists"] == relists + 1
    assert _held(kube_plane, f"Secret/{ns}/other-tls").certificate_pem == base64.b64decode(
        other["data"]["tls.crt"]
    )
    # A changed certificate is followed too.
    renewed = _secret(ns, "other-tls", "shop.example")
    _apply(kube_plane, renewed)
    want = base64.b64decode(renewed["data"]["tls.crt"])
    assert wait_until(
        lambda: getattr(_held(kube_plane, f"Secret/{ns}/other-tls"), "certificate_pem", b"") == want,
        SYNC_TIMEOUT,
    )
    kube_plane.api.kubectl_run("delete", "-n", ns, "httproute/shop", "wafpolicy/strict", "secret/other-tls")
    gone = [f"HTTPRoute/{ns}/shop", f"WafPolicy/{ns}/strict", f"Secret/{ns}/other-tls"]
    assert wait_until(lambda: not any(_held(kube_plane, k) for k in gone), SYNC_TIMEOUT)
    kube_plane.api.kubectl_run("delete", "-n", ns, "gateway/edge")
    assert wait_until(lambda: _held(kube_plane, f"Gateway/{ns}/edge") is None, SYNC_TIMEOUT)
    kube_plane.api.kubectl_run("delete", "gatewayclass", cls)


def test_secrets_never_reach_a_node(kube_plane: KubePlane) -> None:
    ns, cls = _setup(kube_plane)
    node = unique("node")
    kube.ensure_node(kube_plane.api.client(), node, "172.31.9.1", "10.251.0.0/24")
    kube.ensure_service_account(kube_plane.api.client(), ns, "web")
    kube.run_pod(
        kube_plane.api.client(), kube.pod_body(ns, "web-0", node, "web", {"app": "web"}, [8080]), "10.251.0.5"
    )
    _apply(kube_plane, _secret(ns, "shop-tls", "shop.example"), _gateway(ns, cls, "shop-tls"))
    assert wait_until(lambda: _held(kube_plane, f"Secret/{ns}/shop-tls"), SYNC_TIMEOUT)
    # The node hosts a workload of the Secret's namespace and subscribes to every kind (Secret included).
    with relay_client(kube_plane.target, kube_plane.ca, node) as (client, rec):
        assert "Secret" in client.types
        snap = rec.wait_for(lambda s: f"{ns}/web-0" in s.workloads, SYNC_TIMEOUT)
        assert snap is not None
        assert snap.version >= kube_plane.store.version  # the Secret was in the store when this was cut
        assert not [k for k in client._held if k.startswith("Secret/")]
    kube_plane.api.kubectl_run("delete", "gatewayclass", cls)


def _conditions(obj: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in obj.get("conditions") or ()}


def _get(plane: KubePlane, kind: str, ns: str, name: str) -> dict[str, Any]:
    args = ["get", kind, name, "-o", "json"] + (["-n", ns] if ns else [])
    out = plane.api.kubectl_run(*args)
    return dict(yaml.safe_load(out.stdout))


def _parent(plane: KubePlane, ns: str, route: str) -> dict[str, tuple[str, str]]:
    parents = [
        p
        for p in (_get(plane, "httproute", ns, route).get("status") or {}).get("parents") or ()
        if p["controllerName"] == CONTROLLER_NAME
    ]
    return _conditions(parents[0]) if parents else {}


def test_status_conditions_say_what_the_gateway_makes_of_each_object(kube_plane: KubePlane) -> None:
    ns, cls = _setup(kube_plane)
    elsewhere = unique("gw")
    kube.ensure_namespace(kube_plane.api.client(), elsewhere)
    _service(kube_plane, ns)
    foreign_class = unique("other")
    bad_waf = _waf(
        ns,
        "typo",
        {
            "targetRefs": [{"kind": "HTTPRoute", "name": "good"}],
            "exclusions": [{"ruleIds": ["999999999"]}],
        },
    )
    good_waf = _waf(ns, "pl1", {"targetRefs": [{"kind": "Gateway", "name": "edge"}]})
    _apply(
        kube_plane,
        _gateway_class(foreign_class, "example.com/another-controller"),
        _secret(ns, "shop-tls", "shop.example"),
        _gateway(ns, cls, "shop-tls"),
        _gateway(ns, foreign_class, "shop-tls", name="theirs"),
        _route(ns, "good", {"name": "web", "port": 80}),
        _route(ns, "missing", {"name": "nope", "port": 80}),
        _route(ns, "kind", {"group": "example.com", "kind": "Bucket", "name": "web"}),
        _route(ns, "cross", {"name": "web", "namespace": elsewhere, "port": 80}),
        _route(elsewhere, "outsider", {"name": "web", "port": 80}, parent_ns=ns),
        bad_waf,
        good_waf,
    )

    def settled() -> bool:
        return bool(_parent(kube_plane, elsewhere, "outsider")) and bool(
            (_get(kube_plane, "wafpolicy", ns, "typo").get("status") or {}).get("conditions")
        )

    assert wait_until(settled, SYNC_TIMEOUT), kube_plane.source.counters()
    gc = _get(kube_plane, "gatewayclass", "", cls)["status"]
    assert _conditions(gc)["Accepted"] == ("True", "Accepted")
    gw = _get(kube_plane, "gateway", ns, "edge")["status"]
    assert _conditions(gw) == {"Accepted": ("True", "Accepted"), "Programmed": ("True", "Programmed")}
    listeners = {lst["name"]: lst for lst in gw["listeners"]}
    assert _conditions(listeners["https"]) == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
        "Programmed": ("True", "Programmed"),
    }
    # good, missing, kind and cross attach (the parser refuses `kind`: it attaches nowhere); outsider is
    # from another namespace and the listeners admit the Gateway's own only.
    assert listeners["http"]["attachedRoutes"] == 3
    assert listeners["https"]["supportedKinds"] == [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}
    ]
    assert all(c["observedGeneration"] == 1 for c in gw["conditions"])
    assert _parent(kube_plane, ns, "good") == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }
    assert _parent(kube_plane, ns, "missing")["ResolvedRefs"] == ("False", "BackendNotFound")
    assert _parent(kube_plane, ns, "kind")["ResolvedRefs"] == ("False", "InvalidKind")
    assert _parent(kube_plane, ns, "cross")["ResolvedRefs"] == ("False", "RefNotPermitted")
    assert _parent(kube_plane, elsewhere, "outsider")["Accepted"] == ("False", "NotAllowedByListeners")
    typo = _get(kube_plane, "wafpolicy", ns, "typo")["status"]["conditions"][0]
    assert (typo["status"], typo["reason"]) == ("False", "Invalid")
    assert "999999999" in typo["message"] and "matches no CRS" in typo["message"]
    pl1 = _get(kube_plane, "wafpolicy", ns, "pl1")["status"]["conditions"][0]
    assert pl1["status"] == "True"
    # Another controller's Gateway: not held, no status from us.
    assert _held(kube_plane, f"Gateway/{ns}/theirs") is None
    assert not (_get(kube_plane, "gateway", ns, "theirs").get("status") or {}).get("listeners")

    # The gateway's LoadBalancer Service (named as the chart names it) gets an address from the cloud's
    # controller: that is the Gateway's address.
    from kubernetes import client

    svc = kube.service_body(ns, f"edge-{cls}", "", [(443, 8443)], {"app": f"edge-{cls}"})
    svc["spec"]["type"] = "LoadBalancer"
    core = client.CoreV1Api(kube_plane.api.client())
    core.create_namespaced_service(ns, svc)
    core.patch_namespaced_service_status(
        f"edge-{cls}", ns, {"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}}}
    )
    assert wait_until(
        lambda: (
            (_get(kube_plane, "gateway", ns, "edge")["status"].get("addresses"))
            == [{"type": "IPAddress", "value": "203.0.113.7"}]
        ),
        SYNC_TIMEOUT,
    )

    # Recomputed with nothing changed (a new Service in the namespace), no status is written again: our
    # own writes come back as MODIFIED events and must not loop.
    before = kube_plane.source.counters()
    _service(kube_plane, ns, "unrelated")
    assert wait_until(
        lambda: (
            _held(kube_plane, f"Service/{ns}/unrelated") is not None
            and kube_plane.source.counters()["gateway_status_runs"] > before["gateway_status_runs"]
        ),
        SYNC_TIMEOUT,
    )
    assert kube_plane.source.counters()["status_queued"] == before["status_queued"]

    # A custom rule libmodsecurity does not compile, and a second policy on the Gateway: both refused with
    # the reason, and the Gateway (whose config the gateway would refuse) is not programmed.
    broken = _waf(
        ns,
        "broken",
        {
            "targetRefs": [{"kind": "HTTPRoute", "name": "missing"}],
            "customRules": ['SecRule ARGS "@rx a" "id:10001,phase:2,nosuchaction"'],
        },
    )
    dup = _waf(ns, "zz-dup", {"targetRefs": [{"kind": "Gateway", "name": "edge"}]})
    _apply(kube_plane, broken, dup)

    def refused(name: str) -> dict[str, Any]:
        conds = (_get(kube_plane, "wafpolicy", ns, name).get("status") or {}).get("conditions") or [{}]
        return dict(conds[0])

    assert wait_until(lambda: refused("broken").get("status") == "False", SYNC_TIMEOUT)
    assert "rules refused" in refused("broken")["message"]
    assert wait_until(lambda: refused("zz-dup").get("status") == "False", SYNC_TIMEOUT)
    assert f"{ns}/pl1 already targets Gateway {ns}/edge" in refused("zz-dup")["message"]
    assert refused("pl1")["status"] == "True"
    assert kube_plane.source.counters()["waf_policies_refused"] >= 3  # typo, broken, zz-dup
    assert wait_until(
        lambda: (
            _conditions(_get(kube_plane, "gateway", ns, "edge")["status"])["Programmed"]
            == ("False", "Invalid")
        ),
        SYNC_TIMEOUT,
    )
    kube_plane.api.kubectl_run("delete", "-n", ns, "wafpolicy/zz-dup", "wafpolicy/broken")
    assert wait_until(
        lambda: (
            _conditions(_get(kube_plane, "gateway", ns, "edge")["status"])["Programmed"]
            == ("True", "Programmed")
        ),
        SYNC_TIMEOUT,
    )

    # The listener's Secret goes away: the listener cannot resolve it and the Gateway is not programmed.
    kube_plane.api.kubectl_run("delete", "-n", ns, "secret/shop-tls")

    def unresolved() -> bool:
        st = _get(kube_plane, "gateway", ns, "edge")["status"]
        https = next(lst for lst in st["listeners"] if lst["name"] == "https")
        return _conditions(https).get("ResolvedRefs") == ("False", "InvalidCertificateRef") and _conditions(
            st
        ).get("Programmed") == ("False", "Invalid")

    assert wait_until(unresolved, SYNC_TIMEOUT)
    kube_plane.api.kubectl_run("delete", "gatewayclass", cls, foreign_class)


def test_service_cidrs_are_mesh_ranges_on_the_nodes(kube_plane: KubePlane) -> None:
    node = unique("node")
    kube.ensure_node(kube_plane.api.client(), node, "172.31.9.2", "10.252.0.0/24")
    name = unique("extra")
    cidr = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": ["10.97.0.0/24"]},
    }
    with relay_client(kube_plane.target, kube_plane.ca, node) as (_, rec):
        # The API server's own default range (--service-cluster-ip-range) is a ServiceCIDR too.
        first = rec.wait_for(lambda s: "kubernetes" in s.service_cidrs, SYNC_TIMEOUT)
        assert first is not None and first.service_cidrs["kubernetes"].cidrs == ("10.96.0.0/16",)
        assert not first.in_mesh_range("10.97.0.9")
        _apply(kube_plane, cidr)
        snap = rec.wait_for(lambda s: name in s.service_cidrs, SYNC_TIMEOUT)
        assert snap is not None and snap.in_mesh_range("10.97.0.9")
        kube_plane.api.kubectl_run("delete", "servicecidr", name, "--wait=true", "--timeout=30s")
        after = rec.wait_for(lambda s: name not in s.service_cidrs, SYNC_TIMEOUT)
        assert after is not None and not after.in_mesh_range("10.97.0.9")


def test_a_secret_in_another_namespace_is_not_permitted_and_not_held(kube_plane: KubePlane) -> None:
    ns, cls = _setup(kube_plane)
    other = unique("gw")
    kube.ensure_namespace(kube_plane.api.client(), other)
    gw = _gateway(ns, cls, "their-tls")
    gw["spec"]["listeners"][0]["tls"]["certificateRefs"][0]["namespace"] = other
    _apply(kube_plane, _secret(other, "their-tls", "shop.example"), gw)

    def listener() -> dict[str, tuple[str, str]]:
        st = _get(kube_plane, "gateway", ns, "edge").get("status") or {}
        return next((_conditions(x) for x in st.get("listeners") or () if x["name"] == "https"), {})

    assert wait_until(lambda: listener().get("ResolvedRefs") == ("False", "RefNotPermitted"), SYNC_TIMEOUT)
    assert _held(kube_plane, f"Gateway/{ns}/edge") is not None
    assert _held(kube_plane, f"Secret/{other}/their-tls") is None
    assert kube_plane.source.counters()["secret_refs_refused"] >= 1
    kube_plane.api.kubectl_run("delete", "gatewayclass", cls)


def test_the_secrets_informer_is_sent_tls_secrets_only(kube_plane: KubePlane) -> None:
    from kubernetes import client

    from mgmt.kube.reflector import Reflector, ResourceType
    from mgmt.kube.source import TLS_SECRETS

    ns = unique("gw")
    kube.ensure_namespace(kube_plane.api.client(), ns)
    seen: list[str] = []

    class Names:
        def retain(self, rtype: ResourceType, names: set[str]) -> None:
            seen.extend(names)

        def apply(self, rtype: ResourceType, event: str, obj: dict[str, Any]) -> None:
            seen.append(f"{obj['metadata']['namespace']}/{obj['metadata']['name']}")

    reflector = Reflector(kube_plane.api.client(), TLS_SECRETS, Names())
    reflector.start()
    try:
        assert reflector.synced.wait(SYNC_TIMEOUT)
        opaque = client.V1Secret(metadata=client.V1ObjectMeta(name="opaque"), string_data={"password": "x"})
        client.CoreV1Api(kube_plane.api.client()).create_namespaced_secret(ns, opaque)
        _apply(kube_plane, _secret(ns, "cert", "shop.example"))
        assert wait_until(lambda: f"{ns}/cert" in seen, SYNC_TIMEOUT)
        # Watch events come in resourceVersion order: the opaque one, created first, was never sent.
        assert f"{ns}/opaque" not in seen
    finally:
        reflector.stop()


def test_a_reference_grant_permits_cross_namespace_refs_until_deleted(kube_plane: KubePlane) -> None:
    ns, cls = _setup(kube_plane)
    bank = unique("bank")
    kube.ensure_namespace(kube_plane.api.client(), bank)
    _service(kube_plane, bank, "pay")
    gateway = _gateway(ns, cls, "bank-tls")
    gateway["spec"]["listeners"][0]["tls"]["certificateRefs"][0]["namespace"] = bank
    route = _route(ns, "pay", {"name": "pay", "namespace": bank, "port": 80})
    # A grant from the wrong namespace allows nothing here.
    wrong = reference_grant_doc("wrong", bank, "Gateway", bank, "Secret")
    _apply(kube_plane, _secret(bank, "bank-tls", "shop.example"), gateway, route, wrong)

    def https() -> dict[str, tuple[str, str]]:
        status = _get(kube_plane, "gateway", ns, "edge").get("status") or {}
        found = [lst for lst in status.get("listeners") or () if lst["name"] == "https"]
        return _conditions(found[0]) if found else {}

    def states(want: str) -> bool:
        expected = ("True", "ResolvedRefs") if want == "granted" else ("False", "RefNotPermitted")
        return (
            https().get("ResolvedRefs") == expected
            and _parent(kube_plane, ns, "pay").get("ResolvedRefs") == expected
        )

    assert wait_until(lambda: states("refused"), SYNC_TIMEOUT), (https(), kube_plane.source.counters())
    assert _held(kube_plane, f"Secret/{bank}/bank-tls") is None
    assert kube_plane.source.counters()["secret_refs_refused"] >= 1
    _apply(
        kube_plane,
        reference_grant_doc("certs", bank, "Gateway", ns, "Secret"),
        reference_grant_doc("backends", bank, "HTTPRoute", ns, "Service"),
    )
    assert wait_until(lambda: states("granted"), SYNC_TIMEOUT), (https(), _parent(kube_plane, ns, "pay"))
    assert _held(kube_plane, f"Secret/{bank}/bank-tls") is not None
    assert _conditions(_get(kube_plane, "gateway", ns, "edge")["status"])["Programmed"] == (
        "True",
        "Programmed",
    )
    # An edit the parser refuses (the CRD's schema lets none through; delivered here as the watch would)
    # revokes the grant at once: a grant is an allow, so no last valid version stays in force.
    from mgmt.kube.source import REFERENCE_GRANTS

    broken = reference_grant_doc("certs", bank, "Gateway", ns, "Secret", to_name="bank-tls")
    broken["spec"]["to"][0]["name"] = ""
    kube_plane.source.apply(REFERENCE_GRANTS, "MODIFIED", broken)
    assert wait_until(lambda: _held(kube_plane, f"Secret/{bank}/bank-tls") is None, SYNC_TIMEOUT)
    assert _held(kube_plane, f"ReferenceGrant/{bank}/certs") is None
    # A real edit (now naming the Secret) is valid again.
    _apply(kube_plane, reference_grant_doc("certs", bank, "Gateway", ns, "Secret", to_name="bank-tls"))
    assert wait_until(lambda: _held(kube_plane, f"Secret/{bank}/bank-tls") is not None, SYNC_TIMEOUT)
    kube_plane.api.kubectl_run("delete", "-n", bank, "referencegrant/certs", "referencegrant/backends")
    assert wait_until(lambda: states("refused"), SYNC_TIMEOUT), (https(), _parent(kube_plane, ns, "pay"))
    assert wait_until(lambda: _held(kube_plane, f"Secret/{bank}/bank-tls") is None, SYNC_TIMEOUT)
    kube_plane.api.kubectl_run("delete", "gatewayclass", cls)
