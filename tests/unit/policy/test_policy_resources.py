"""Policy documents: what parses, and that malformed ones are rejected with a message naming the problem."""

from __future__ import annotations

from typing import Any

import pytest

from api.resources import ResourceError, load_kinds, parse
from api.resources.policy import AuthorizationPolicy, MeshConfig, PeerAuthentication, RegoPolicy

load_kinds()


def doc(kind: str, spec: Any, api: str = "security.istio.io/v1", ns: str | None = "shop") -> dict[str, Any]:
    md: dict[str, Any] = {"name": "p"}
    if ns is not None:
        md["namespace"] = ns
    return {"apiVersion": api, "kind": kind, "metadata": md, "spec": spec}


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


BAD = [
    ("unknown-spec-field", doc("AuthorizationPolicy", {"actions": "ALLOW"}), "unknown field(s) actions"),
    ("bad-action", doc("AuthorizationPolicy", {"action": "PERMIT"}), "spec.action 'PERMIT'"),
    ("custom-action", doc("AuthorizationPolicy", {"action": "CUSTOM"}), "CUSTOM"),
    (
        "l7-methods",
        doc("AuthorizationPolicy", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        "L7",
    ),
    (
        "l7-request-principals",
        doc("AuthorizationPolicy", {"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}),
        "L7",
    ),
    (
        "empty-source",
        doc("AuthorizationPolicy", {"rules": [{"from": [{"source": {}}]}]}),
        "at least one field",
    ),
    (
        "bad-cidr",
        doc("AuthorizationPolicy", {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300/8"]}}]}]}),
        "not an IP address or CIDR",
    ),
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
    (
        "when-key",
        doc("AuthorizationPolicy", {"rules": [{"when": [{"key": "request.headers[x]", "values": ["a"]}]}]}),
        "not supported at L4",
    ),
    (
        "when-empty",
        doc("AuthorizationPolicy", {"rules": [{"when": [{"key": "source.ip"}]}]}),
        "values or notValues",
    ),
    ("rules-not-list", doc("AuthorizationPolicy", {"rules": {"from": []}}), "spec.rules must be a list"),
    ("dry-run-string", doc("AuthorizationPolicy", {"dryRun": "yes"}), "spec.dryRun must be true or false"),
    ("selector-field", doc("AuthorizationPolicy", {"selector": {"app": "web"}}), "unknown field(s) app"),
    ("target-ref", doc("AuthorizationPolicy", {"targetRef": {"kind": "Service"}}), "targetRef"),
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
