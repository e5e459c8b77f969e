"""Policy documents: what parses, and that malformed ones are rejected with a message naming the problem."""

from __future__ import annotations

from typing import Any

import pytest

from api.resources import ResourceError, load_kinds, parse
from api.resources.policy import AuthorizationPolicy, MeshConfig, PeerAuthentication, RegoPolicy

load_kinds()


def doc(
    kind: str,
    spec: Any,
    api: str = "security.istio.io/v1",
    ns: str | None = "shop",
    annotations: Any = None,
) -> dict[str, Any]:
    md: dict[str, Any] = {"name": "p"}
    if ns is not None:
        md["namespace"] = ns
    if annotations is not None:
        md["annotations"] = annotations
    return {"apiVersion": api, "kind": kind, "metadata": md, "spec": spec}


def ap_doc(spec: Any, **kwargs: Any) -> dict[str, Any]:
    return doc("AuthorizationPolicy", spec, **kwargs)


def rules_doc(*rules: Any, **spec: Any) -> dict[str, Any]:
    return ap_doc({**spec, "rules": list(rules)})


def source_doc(**fields: Any) -> dict[str, Any]:
    return rules_doc({"from": [{"source": fields}]})


def when_doc(key: str, values: Any = ("a",)) -> dict[str, Any]:
    return rules_doc({"when": [{"key": key, "values": list(values)}]})


def test_authorization_policy_parses_every_field() -> None:
    p = parse(
        doc(
            "AuthorizationPolicy",
            {
                "selector": {"matchLabels": {"app": "web"}},
                "action": "DENY",
                "dryRun": True,
                "rules": [
                    {
                        "from": [
                            {
                                "source": {
                                    "principals": ["cluster.local/ns/a/sa/*"],
                                    "notPrincipals": ["*/sa/evil"],
                                    "namespaces": ["a"],
                                    "notNamespaces": ["b*"],
                                    "ipBlocks": ["10.0.0.1/8"],
                                    "notIpBlocks": ["10.9.0.0/16"],
                                }
                            }
                        ],
                        "to": [{"operation": {"ports": ["80", 443], "notPorts": ["22"]}}],
                        "when": [{"key": "destination.port", "values": ["80"], "notValues": [8080]}],
                    }
                ],
            },
        )
    )
    assert isinstance(p, AuthorizationPolicy)
    assert p.uid == "shop/p" and p.action == "DENY" and p.dry_run and p.selector == {"app": "web"}
    rule = p.rules[0]
    assert rule.sources[0].ip_blocks == ("10.0.0.0/8",)  # normalised
    assert rule.operations[0].ports == (80, 443) and rule.operations[0].not_ports == (22,)
    assert rule.conditions[0].values == ("80",) and rule.conditions[0].not_values == ("8080",)


def test_defaults_and_other_kinds() -> None:
    p = parse(doc("AuthorizationPolicy", {}))
    assert p.action == "ALLOW" and p.rules == () and p.selector is None and not p.dry_run
    assert parse(doc("AuthorizationPolicy", {"selector": {"matchLabels": {}}})).selector is None
    pa = parse(
        doc(
            "PeerAuthentication",
            {"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}},
        )
    )
    assert isinstance(pa, PeerAuthentication) and pa.mode == "UNSET" and pa.port_modes == {8080: "DISABLE"}
    r = parse(doc("RegoPolicy", {"module": "package ambit\n"}, api="ambit.io/v1"))
    assert isinstance(r, RegoPolicy) and r.query == "data.ambit.authz"
    m = parse(doc("MeshConfig", {"defaultDeny": True}, api="ambit.io/v1", ns=None))
    assert isinstance(m, MeshConfig) and m.default_deny and m.root_namespace == "istio-system"
    assert m.trust_domain is None and m.default_mtls_mode == "PERMISSIVE"


ISTIO_YAML = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/curl"]
    - source:
        namespaces: ["test"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
  - from:
    - source:
        serviceAccounts: ["default/curl", "sleep"]
    to:
    - operation:
        ports: ["8080"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-path-headers
  namespace: foo
  annotations:
    "istio.io/dry-run": "true"
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/headers"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-viewer
  namespace: bookinfo
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: reviews
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/bookinfo/sa/bookinfo-productpage"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ext-authz
  namespace: istio-system
spec:
  selector:
    matchLabels:
      app: istio-ingressgateway
  action: CUSTOM
  provider:
    name: "my-custom-authz"
  rules:
  - to:
    - operation:
        paths: ["/admin/*"]
"""


def test_istio_yaml_parses_with_its_l7_parts_recorded() -> None:
    import yaml

    allow, dry, waypoint, custom = (parse(d, "istio.yaml") for d in yaml.safe_load_all(ISTIO_YAML))
    assert allow.action == "ALLOW" and allow.enforced_by_node
    assert allow.rules[0].l7_attributes == ("methods", "paths", "request.auth.claims[iss]")
    assert allow.rules[0].operations[0].l7 == ("methods", "paths") and allow.rules[0].conditions[0].l7
    assert allow.rules[1].l7_attributes == ()
    assert allow.rules[1].sources[0].service_accounts == ("default/curl", "foo/sleep")  # bare: policy ns
    assert allow.warnings == (
        "rule(s) 0 use L7 attributes (methods, paths, request.auth.claims[iss]) and never match at L4 "
        "(more restrictive than requested); use a waypoint for L7",
    )
    assert dry.dry_run and dry.action == "DENY" and dry.meta.annotations == {"istio.io/dry-run": "true"}
    assert "enforced on their L4 part only" in dry.warnings[0]
    assert not waypoint.enforced_by_node and waypoint.selector is None
    assert [str(t) for t in waypoint.target_refs] == ["Service/reviews"]
    assert waypoint.warnings == (
        "bound to targetRefs (Service/reviews): enforced by a waypoint, not by the node",
    )
    assert custom.action == "CUSTOM" and custom.provider == "my-custom-authz"
    assert "'my-custom-authz' is not reachable from the node" in custom.warnings[0]
    assert "enforced on their L4 part only" in custom.warnings[1]


def test_dry_run_annotation_values_follow_go_parse_bool() -> None:
    for text, expected in (
        ("true", True),
        ("True", True),
        ("1", True),
        ("t", True),
        ("false", False),
        ("0", False),
    ):
        assert parse(ap_doc({"action": "DENY"}, annotations={DRY: text})).dry_run is expected
    assert parse(ap_doc({"dryRun": True}, annotations={DRY: "true"})).dry_run
    assert parse(ap_doc({}, annotations={"other": "x"})).meta.annotations == {"other": "x"}
    target = parse(
        ap_doc({"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "w"}})
    )
    assert [str(t) for t in target.target_refs] == ["gateway.networking.k8s.io/Gateway/w"]


CUSTOM = {"action": "CUSTOM", "provider": {"name": "ext-authz"}}
DRY = "istio.io/dry-run"

BAD = [
    ("unknown-spec-field", doc("AuthorizationPolicy", {"actions": "ALLOW"}), "unknown field(s) actions"),
    ("bad-action", doc("AuthorizationPolicy", {"action": "PERMIT"}), "spec.action 'PERMIT'"),
    ("custom-no-rules", doc("AuthorizationPolicy", {"action": "CUSTOM"}), "CUSTOM action without rules"),
    ("custom-no-provider", rules_doc({}, action="CUSTOM"), "spec.provider must be a mapping"),
    ("custom-empty-provider", rules_doc({}, action="CUSTOM", provider={"name": ""}), "spec.provider.name"),
    ("custom-provider-field", rules_doc({}, action="CUSTOM", provider={"nom": "x"}), "unknown field(s) nom"),
    *[
        (
            f"custom-{field}",
            rules_doc({"from": [{"source": {field: value}}]}, **CUSTOM),
            f"source.{field}: not supported with CUSTOM",
        )
        for field, value in (
            ("principals", ["cluster.local/ns/a/sa/b"]),
            ("notNamespaces", ["a"]),
            ("serviceAccounts", ["a/b"]),
            ("requestPrincipals", ["*"]),
        )
    ],
    (
        "custom-when-principal",
        rules_doc({"when": [{"key": "source.principal", "values": ["a/ns/b/sa/c"]}]}, **CUSTOM),
        "source.principal is not supported with CUSTOM",
    ),
    (
        "custom-when-claims",
        rules_doc({"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}, **CUSTOM),
        "request.auth.claims[iss] is not supported with CUSTOM",
    ),
    ("provider-without-custom", rules_doc({}, provider={"name": "x"}), "only valid with action CUSTOM"),
    (
        "empty-source",
        doc("AuthorizationPolicy", {"rules": [{"from": [{"source": {}}]}]}),
        "at least one field",
    ),
    ("empty-operation", rules_doc({"to": [{"operation": {}}]}), "at least one field"),
    ("l7-not-a-list", rules_doc({"to": [{"operation": {"methods": "GET"}}]}), "methods must be a list"),
    ("l7-empty-value", rules_doc({"to": [{"operation": {"paths": [""]}}]}), "must be a non-empty string"),
    ("l7-not-a-string", source_doc(requestPrincipals=[7]), "7 must be a non-empty string"),
    (
        "l7-unknown-operation-field",
        rules_doc({"to": [{"operation": {"method": ["GET"]}}]}),
        "field(s) method",
    ),
    (
        "bad-cidr",
        doc("AuthorizationPolicy", {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300/8"]}}]}]}),
        "not an IP address or CIDR",
    ),
    ("bad-remote-ip-block-condition", when_doc("remote.ip", ["10.0.0.300"]), "not an IP address or CIDR"),
    (
        "bad-port",
        doc("AuthorizationPolicy", {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
        "not a port number",
    ),
    (
        "port-range",
        doc("AuthorizationPolicy", {"rules": [{"to": [{"operation": {"ports": [70000]}}]}]}),
        "not a port number",
    ),
    (
        "mid-wildcard",
        doc("AuthorizationPolicy", {"rules": [{"from": [{"source": {"principals": ["a*b"]}}]}]}),
        "'*' is only allowed",
    ),
    (
        "double-wildcard",
        doc("AuthorizationPolicy", {"rules": [{"from": [{"source": {"namespaces": ["*a*"]}}]}]}),
        "'*' is only allowed",
    ),
    # -- spiffe:// in principals: Istio's form has no scheme, so it could never match ---------------------
    (
        "spiffe-principal",
        source_doc(principals=["spiffe://cluster.local/ns/a/sa/b"]),
        "without 'spiffe://' (<trust domain>/ns/<namespace>/sa/<service account>, here 'cluster.local/ns/a",
    ),
    (
        "spiffe-not-principal",
        source_doc(notPrincipals=["SPIFFE://cluster.local/ns/a/*"]),
        "without 'spiffe://'",
    ),
    ("spiffe-prefix-pattern", source_doc(principals=["spiffe://*"]), "without 'spiffe://'"),
    ("spiffe-when-principal", when_doc("source.principal", ["spiffe://td/ns/a/sa/b"]), "without 'spiffe://'"),
    # -- serviceAccounts ------------------------------------------------------------------------------------
    ("sa-wildcard", source_doc(serviceAccounts=["front/*"]), "no wildcards in service accounts"),
    ("sa-wildcard-bare", source_doc(notServiceAccounts=["*"]), "no wildcards in service accounts"),
    ("sa-three-parts", source_doc(serviceAccounts=["a/b/c"]), "must be <namespace>/<serviceaccount>"),
    ("sa-empty-namespace", source_doc(serviceAccounts=["/b"]), "must be <namespace>/<serviceaccount>"),
    ("sa-empty-name", source_doc(serviceAccounts=["a/"]), "must be <namespace>/<serviceaccount>"),
    (
        "sa-spiffe",
        source_doc(serviceAccounts=["spiffe://td/ns/a/sa/b"]),
        "must be <namespace>/<serviceaccount>",
    ),
    ("sa-empty", source_doc(serviceAccounts=[""]), "must be a non-empty string"),
    ("sa-not-a-list", source_doc(serviceAccounts="a/b"), "serviceAccounts must be a list"),
    ("sa-too-many", source_doc(serviceAccounts=[f"ns/sa{i}" for i in range(17)]), "at most 16 entries"),
    ("sa-too-long", source_doc(serviceAccounts=["ns/" + "a" * 320]), "longer than 320 characters"),
    (
        "sa-with-principals",
        source_doc(serviceAccounts=["a/b"], principals=["cluster.local/ns/a/sa/b"]),
        "serviceAccounts cannot be set with principals or namespaces",
    ),
    (
        "not-sa-with-namespaces",
        source_doc(notServiceAccounts=["a/b"], namespaces=["a"]),
        "serviceAccounts cannot be set with principals or namespaces",
    ),
    # -- when keys: L4, L7 (kept) or refused as Istio refuses them --
    ("when-unknown-key", when_doc("request.body"), "'request.body' is not an Istio attribute"),
    ("when-key-typo", when_doc("source.principals"), "is not an Istio attribute"),
    ("when-header-no-name", when_doc("request.headers"), "is not an Istio attribute"),
    ("when-header-empty-name", when_doc("request.headers[]"), "is not an Istio attribute"),
    ("when-destination-namespace", when_doc("destination.namespace"), "replaced by the policy's metadata"),
    ("when-destination-labels", when_doc("destination.labels[app]"), "replaced by spec.selector"),
    ("when-destination-user", when_doc("destination.user"), "deprecated"),
    ("when-no-key", rules_doc({"when": [{"values": ["a"]}]}), "when[0].key is required"),
    ("when-l7-empty-value", when_doc("request.headers[x]", [""]), "must be a non-empty string"),
    (
        "when-empty",
        doc("AuthorizationPolicy", {"rules": [{"when": [{"key": "source.ip"}]}]}),
        "values or notValues",
    ),
    ("rules-not-list", doc("AuthorizationPolicy", {"rules": {"from": []}}), "spec.rules must be a list"),
    ("dry-run-string", doc("AuthorizationPolicy", {"dryRun": "yes"}), "spec.dryRun must be true or false"),
    # -- the istio.io/dry-run annotation ---------------------------------------------------------------------
    ("dry-run-annotation-yes", ap_doc({}, annotations={DRY: "yes"}), "'yes' is not a boolean"),
    ("dry-run-annotation-empty", ap_doc({}, annotations={DRY: ""}), "'' is not a boolean"),
    (
        "dry-run-annotation-unquoted",
        ap_doc({}, annotations={DRY: True}),
        "annotations must be a map of strings",
    ),
    (
        "dry-run-annotation-audit",
        ap_doc({"action": "AUDIT"}, annotations={DRY: "true"}),
        "dry-run applies to ALLOW and DENY only (as in Istio), not AUDIT",
    ),
    (
        "dry-run-annotation-custom",
        rules_doc({}, **CUSTOM) | {"metadata": {"name": "p", "annotations": {DRY: "1"}}},
        "not CUSTOM",
    ),  # fmt: skip
    (
        "dry-run-annotation-disagrees",
        ap_doc({"dryRun": False}, annotations={DRY: "true"}),
        "and spec.dryRun disagree",
    ),
    ("annotations-not-a-map", ap_doc({}, annotations=["a"]), "annotations must be a map of strings"),
    # -- selector / targetRef / targetRefs --
    ("selector-field", doc("AuthorizationPolicy", {"selector": {"app": "web"}}), "unknown field(s) app"),
    ("target-ref-no-name", doc("AuthorizationPolicy", {"targetRef": {"kind": "Service"}}), "targetRef.name"),
    ("target-refs-no-kind", ap_doc({"targetRefs": [{"name": "web"}]}), "spec.targetRefs[0].kind"),
    ("target-refs-not-list", ap_doc({"targetRefs": {"kind": "Service", "name": "web"}}), "must be a list"),
    ("target-refs-field", ap_doc({"targetRefs": [{"kind": "S", "name": "w", "port": 1}]}), "field(s) port"),
    ("target-refs-group-type", ap_doc({"targetRefs": [{"kind": "S", "name": "w", "group": 1}]}), "strings"),
    (
        "selector-and-target-refs",
        ap_doc({"selector": {"matchLabels": {"a": "b"}}, "targetRefs": [{"kind": "Service", "name": "w"}]}),
        "only one of selector, targetRef, targetRefs may be set: selector, targetRefs",
    ),
    (
        "target-ref-and-target-refs",
        ap_doc({"targetRef": {"kind": "S", "name": "w"}, "targetRefs": [{"kind": "S", "name": "v"}]}),
        "only one of",
    ),
    ("pa-mode", doc("PeerAuthentication", {"mtls": {"mode": "STRICTER"}}), "STRICTER"),
    (
        "pa-ports-no-selector",
        doc("PeerAuthentication", {"portLevelMtls": {"80": {"mode": "STRICT"}}}),
        "requires spec.selector",
    ),
    ("rego-no-module", doc("RegoPolicy", {"query": "data.x"}, api="ambit.io/v1"), "spec.module"),
    ("rego-istio-api", doc("RegoPolicy", {"module": "package x"}), "apiVersion must be"),
    ("mesh-namespaced", doc("MeshConfig", {}, api="ambit.io/v1"), "cluster-scoped"),
    (
        "mesh-default-deny-type",
        doc("MeshConfig", {"defaultDeny": "true"}, api="ambit.io/v1", ns=None),
        "true or false",
    ),
    (
        "mesh-mtls-mode",
        doc("MeshConfig", {"defaultMtlsMode": "UNSET"}, api="ambit.io/v1", ns=None),
        "defaultMtlsMode",
    ),
]


@pytest.mark.parametrize(("case", "document", "message"), BAD, ids=[b[0] for b in BAD])
def test_malformed_policy_rejected(case: str, document: dict[str, Any], message: str) -> None:
    with pytest.raises(ResourceError) as exc:
        parse(document, "policies.yaml:3")
    assert message in str(exc.value)
    assert str(exc.value).startswith("policies.yaml:3: ")


def test_docs_examples_parse_and_compile() -> None:
    """Every YAML example in docs/policy.md is a valid policy set (the docs cannot drift from the parser)."""
    import re
    from pathlib import Path

    import yaml

    from agent.policy.engine import PolicyEngine
    from agent.state import MeshSnapshot

    text = (Path(__file__).resolve().parents[3] / "docs" / "policy.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    objects = [parse(d, "docs/policy.md") for b in blocks for d in yaml.safe_load_all(b)]
    assert {o.kind for o in objects} == {"AuthorizationPolicy", "RegoPolicy", "MeshConfig"}
    PolicyEngine("cluster.local").update(MeshSnapshot.from_objects(1, "cluster.local", "n1", objects))
