"""Table-driven authorization tests: each field, negation, scope, precedence, default-deny, dry-run, Rego,
and the Istio semantics an Istio YAML keeps here: the istio-system root namespace, the istio.io/dry-run
annotation, serviceAccounts, L7 attributes enforced as ztunnel does at L4, targetRefs, CUSTOM; plus the
enrolment labels (istio.io/ and ambit.io/dataplane-mode).

Every authorization case compiles its policies into a fresh engine over a mesh of three workloads (shop/web,
shop/db, other/api) and checks one decision for one connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from agent import enrolment
from agent.policy.decision import ConnectionAttrs
from agent.policy.engine import PolicyEngine
from agent.state import MeshSnapshot
from api.resources import load_kinds, parse
from api.spiffe import SpiffeId

load_kinds()

TD = "cluster.local"
CLIENT = "cluster.local/ns/front/sa/client"

WORKLOADS = [
    {"name": "web", "namespace": "shop", "labels": {"app": "web"}, "ip": "10.244.1.2"},
    {"name": "db", "namespace": "shop", "labels": {"app": "db"}, "ip": "10.244.1.3"},
    {"name": "api", "namespace": "other", "labels": {"app": "web"}, "ip": "10.244.2.2"},
]


def workload_doc(w: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "ambit.io/v1",
        "kind": "Workload",
        "metadata": {"name": w["name"], "namespace": w["namespace"], "labels": w["labels"]},
        "spec": {"serviceAccount": w["name"], "node": "node-1", "ips": [w["ip"]]},
    }


def ap(
    name: str = "p",
    ns: str = "shop",
    action: str | None = None,
    selector: dict[str, str] | None = None,
    rules: list[dict[str, Any]] | None = None,
    dry_run: bool | None = None,
    api: str = "security.istio.io/v1",
    annotations: dict[str, str] | None = None,
    **extra: Any,  # more spec fields: provider, targetRefs, targetRef
) -> dict[str, Any]:
    spec: dict[str, Any] = dict(extra)
    if action:
        spec["action"] = action
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if rules is not None:
        spec["rules"] = rules
    if dry_run is not None:
        spec["dryRun"] = dry_run
    metadata: dict[str, Any] = {"name": name, "namespace": ns}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {"apiVersion": api, "kind": "AuthorizationPolicy", "metadata": metadata, "spec": spec}


def src(**fields: Any) -> dict[str, Any]:
    """One rule with one `from` source."""
    return {"from": [{"source": fields}]}


def op(**fields: Any) -> dict[str, Any]:
    """One rule with one `to` operation."""
    return {"to": [{"operation": fields}]}


def when(key: str, *values: str) -> dict[str, Any]:
    """One rule with one `when` condition."""
    return {"when": [{"key": key, "values": list(values)}]}


def mesh(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "ambit.io/v1", "kind": "MeshConfig", "metadata": {"name": "default"}, "spec": spec}


def pa(
    name: str = "pa",
    ns: str = "shop",
    mode: str | None = None,
    selector: dict[str, str] | None = None,
    ports: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if mode:
        spec["mtls"] = {"mode": mode}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if ports:
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def rego(
    module: str,
    name: str = "r",
    ns: str = "shop",
    selector: dict[str, str] | None = None,
    query: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"module": module}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if query is not None:
        spec["query"] = query
    return {
        "apiVersion": "ambit.io/v1",
        "kind": "RegoPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def snapshot(docs: list[dict[str, Any]], version: int = 1, td: str = TD) -> MeshSnapshot:
    objects = [parse(workload_doc(w), "test") for w in WORKLOADS] + [parse(d, "test") for d in docs]
    return MeshSnapshot.from_objects(version, td, "node-1", objects)


def engine_with(docs: list[dict[str, Any]], td: str = TD, **kwargs: Any) -> PolicyEngine:
    engine = PolicyEngine(td, **kwargs)
    engine.update(snapshot(docs, td=td))
    return engine


def conn(
    principal: str | None = CLIENT,
    ip: str = "10.0.0.5",
    port: int = 80,
    dst: str = "shop/web",
    dst_ip: str = "10.244.1.2",
) -> ConnectionAttrs:
    return ConnectionAttrs(
        source_principal=SpiffeId.parse("spiffe://" + principal) if principal else None,
        source_ip=ip,
        destination_ip=dst_ip,
        destination_port=port,
        destination_workload=dst,
        destination_namespace=dst.partition("/")[0],
        tls=principal is not None,
    )


REGO_PORTS = """
package ambit
import rego.v1
default authz := {"allow": false, "reason": "port not allowed"}
authz := {"allow": true, "reason": "web port"} if input.destination_port == 80
"""
# Two complete-rule definitions that both hold for port 9999: rego-cpp reports a conflict error.
REGO_CONFLICT = """
package ambit
import rego.v1
authz := {"allow": true, "reason": "high"} if input.destination_port > 1000
authz := {"allow": false, "reason": "exact"} if input.destination_port == 9999
default authz := {"allow": true, "reason": "default"}
"""
REGO_NO_DEFAULT = """
package ambit
import rego.v1
authz := {"allow": true, "reason": "only 8080"} if input.destination_port == 8080
"""
REGO_PLAINTEXT = """
package ambit
import rego.v1
default authz := {"allow": true, "reason": "mTLS"}
authz := {"allow": false, "reason": sprintf("plaintext from %s", [input.source_ip])} if {
    input.source_principal == null
}
"""
REGO_BOOL = """
package ambit
import rego.v1
default allow := false
allow if input.source_namespace == "front"
"""
REGO_LABELS = """
package ambit
import rego.v1
default authz := {"allow": false, "reason": "not a web workload"}
authz := {"allow": true, "reason": "web"} if input.destination_labels.app == "web"
"""


@dataclass(frozen=True)
class Case:
    id: str
    docs: list[dict[str, Any]]
    allow: bool
    policy: str | None = None  # expected deciding policy ("" = default), None = not checked
    attrs: dict[str, Any] = field(default_factory=dict)
    audited: bool = False
    dry_run: bool = False
    reason: str = ""  # substring expected in the reason
    td: str = TD


NO = None  # plaintext peer
ALLOW_P = "shop/p"
DRY = "istio.io/dry-run"
SVC_REF = {"kind": "Service", "group": "", "name": "web"}
PROVIDER = {"name": "ext-authz"}
HEADER_AND_PORT = [
    {"key": "request.headers[x-user]", "values": ["a"]},
    {"key": "destination.port", "values": ["80"]},
]
DENY_HEADER_AND_PORT = ap(action="DENY", rules=[{"when": HEADER_AND_PORT}])

CASES = [
    # -- no policy / defaults -------------------------------------------------------------------------
    Case("no-policy-allows", [], True, ""),
    Case("no-policy-plaintext-allows", [], True, "", {"principal": NO}),
    # -- principals -----------------------------------------------------------------------------------
    Case("principals-exact", [ap(rules=[src(principals=[CLIENT])])], True, ALLOW_P),
    Case("principals-exact-miss", [ap(rules=[src(principals=["cluster.local/ns/front/sa/x"])])], False, ""),
    Case("principals-prefix", [ap(rules=[src(principals=["cluster.local/ns/front/*"])])], True, ALLOW_P),
    Case("principals-prefix-miss", [ap(rules=[src(principals=["cluster.local/ns/back/*"])])], False),
    Case("principals-suffix", [ap(rules=[src(principals=["*/sa/client"])])], True, ALLOW_P),
    Case("principals-any-authenticated", [ap(rules=[src(principals=["*"])])], True, ALLOW_P),
    Case("principals-any-plaintext", [ap(rules=[src(principals=["*"])])], False, "", {"principal": NO}),
    Case("principals-exact-plaintext", [ap(rules=[src(principals=[CLIENT])])], False, "", {"principal": NO}),
    Case("principals-list-or", [ap(rules=[src(principals=["cluster.local/ns/a/sa/b", CLIENT])])], True),
    Case(
        "principals-other-td",
        [ap(rules=[src(principals=[CLIENT])])],
        False,
        "",
        {"principal": "evil.org/ns/front/sa/client"},
    ),
    Case(
        "principals-td-alias",
        [ap(rules=[src(principals=[CLIENT])])],
        True,
        ALLOW_P,
        {"principal": "example.org/ns/front/sa/client"},
        td="example.org",
    ),
    Case("not-principals-other", [ap(rules=[src(notPrincipals=["cluster.local/ns/x/sa/y"])])], True, ALLOW_P),
    Case("not-principals-excluded", [ap(rules=[src(notPrincipals=[CLIENT])])], False, ""),
    Case("not-principals-wildcard", [ap(rules=[src(notPrincipals=["cluster.local/ns/front/*"])])], False),
    Case(
        "not-principals-plaintext",
        [ap(rules=[src(notPrincipals=[CLIENT])])],
        True,
        ALLOW_P,
        {"principal": NO},
    ),
    # -- namespaces -----------------------------------------------------------------------------------
    Case("namespaces-match", [ap(rules=[src(namespaces=["front"])])], True, ALLOW_P),
    Case("namespaces-miss", [ap(rules=[src(namespaces=["back"])])], False, ""),
    Case("namespaces-prefix", [ap(rules=[src(namespaces=["fr*"])])], True, ALLOW_P),
    Case("namespaces-suffix", [ap(rules=[src(namespaces=["*ont"])])], True, ALLOW_P),
    Case("namespaces-plaintext", [ap(rules=[src(namespaces=["front"])])], False, "", {"principal": NO}),
    Case(
        "namespaces-node-identity",
        [ap(rules=[src(namespaces=["front"])])],
        False,
        "",
        {"principal": "cluster.local/node/node-2"},
    ),
    Case("not-namespaces-excluded", [ap(rules=[src(notNamespaces=["front"])])], False, ""),
    Case("not-namespaces-other", [ap(rules=[src(notNamespaces=["back"])])], True, ALLOW_P),
    # -- ipBlocks -------------------------------------------------------------------------------------
    Case("ipblocks-cidr", [ap(rules=[src(ipBlocks=["10.0.0.0/24"])])], True, ALLOW_P),
    Case("ipblocks-cidr-miss", [ap(rules=[src(ipBlocks=["10.1.0.0/16"])])], False, ""),
    Case("ipblocks-single-ip", [ap(rules=[src(ipBlocks=["10.0.0.5"])])], True, ALLOW_P),
    Case("ipblocks-plaintext", [ap(rules=[src(ipBlocks=["10.0.0.0/8"])])], True, ALLOW_P, {"principal": NO}),
    Case("ipblocks-v6", [ap(rules=[src(ipBlocks=["fd00::/64"])])], True, ALLOW_P, {"ip": "fd00::7"}),
    Case("ipblocks-v6-vs-v4", [ap(rules=[src(ipBlocks=["::/0"])])], False, "", {"ip": "10.0.0.5"}),
    Case("not-ipblocks-excluded", [ap(rules=[src(notIpBlocks=["10.0.0.0/24"])])], False, ""),
    Case("not-ipblocks-other", [ap(rules=[src(notIpBlocks=["192.168.0.0/16"])])], True, ALLOW_P),
    # -- ports ----------------------------------------------------------------------------------------
    Case("ports-match", [ap(rules=[{"to": [{"operation": {"ports": ["80"]}}]}])], True, ALLOW_P),
    Case("ports-miss", [ap(rules=[{"to": [{"operation": {"ports": ["8080"]}}]}])], False, ""),
    Case(
        "ports-int", [ap(rules=[{"to": [{"operation": {"ports": [8080]}}]}])], True, ALLOW_P, {"port": 8080}
    ),
    Case("not-ports-excluded", [ap(rules=[{"to": [{"operation": {"notPorts": ["80"]}}]}])], False, ""),
    Case("not-ports-other", [ap(rules=[{"to": [{"operation": {"notPorts": ["22"]}}]}])], True, ALLOW_P),
    Case(
        "to-list-or",
        [ap(rules=[{"to": [{"operation": {"ports": ["1"]}}, {"operation": {"ports": ["80"]}}]}])],
        True,
        ALLOW_P,
    ),
    # -- when conditions ------------------------------------------------------------------------------
    Case("when-principal", [ap(rules=[{"when": [{"key": "source.principal", "values": [CLIENT]}]}])], True),
    Case(
        "when-principal-not",
        [ap(rules=[{"when": [{"key": "source.principal", "notValues": [CLIENT]}]}])],
        False,
    ),
    Case("when-namespace", [ap(rules=[{"when": [{"key": "source.namespace", "values": ["front"]}]}])], True),
    Case(
        "when-namespace-not",
        [ap(rules=[{"when": [{"key": "source.namespace", "notValues": ["f*"]}]}])],
        False,
    ),
    Case("when-ip", [ap(rules=[{"when": [{"key": "source.ip", "values": ["10.0.0.0/16"]}]}])], True),
    Case("when-ip-not", [ap(rules=[{"when": [{"key": "source.ip", "notValues": ["10.0.0.5"]}]}])], False),
    Case("when-port", [ap(rules=[{"when": [{"key": "destination.port", "values": ["80", "443"]}]}])], True),
    Case("when-port-not", [ap(rules=[{"when": [{"key": "destination.port", "notValues": ["80"]}]}])], False),
    Case(
        "when-destination-ip",
        [ap(rules=[{"when": [{"key": "destination.ip", "values": ["10.244.1.0/24"]}]}])],
        True,
    ),
    Case(
        "when-all-and",
        [
            ap(
                rules=[
                    {
                        "when": [
                            {"key": "source.namespace", "values": ["front"]},
                            {"key": "destination.port", "values": ["443"]},
                        ]
                    }
                ]
            )
        ],
        False,
    ),
    # -- AND / OR structure ---------------------------------------------------------------------------
    Case(
        "source-fields-and-miss", [ap(rules=[src(principals=[CLIENT], ipBlocks=["192.168.0.0/16"])])], False
    ),
    Case("source-fields-and-match", [ap(rules=[src(principals=[CLIENT], namespaces=["front"])])], True),
    Case(
        "from-list-or",
        [ap(rules=[{"from": [{"source": {"namespaces": ["x"]}}, {"source": {"ipBlocks": ["10.0.0.0/8"]}}]}])],
        True,
        ALLOW_P,
    ),
    Case("rules-or", [ap(rules=[src(namespaces=["x"]), src(namespaces=["front"])])], True, ALLOW_P),
    Case(
        "from-and-to",
        [ap(rules=[{**src(namespaces=["front"]), "to": [{"operation": {"ports": ["443"]}}]}])],
        False,
    ),
    # -- empty rules ----------------------------------------------------------------------------------
    Case("allow-nothing", [ap(rules=None)], False, "", reason="no ALLOW policy matched"),
    Case("allow-all", [ap(rules=[{}])], True, ALLOW_P, {"principal": NO}),
    Case("deny-all", [ap(action="DENY", rules=[{}])], False, ALLOW_P, reason="DENY"),
    Case("deny-no-rules-matches-nothing", [ap(action="DENY", rules=None)], True, ""),
    # -- actions and precedence -----------------------------------------------------------------------
    Case("deny-principal", [ap(action="DENY", rules=[src(principals=[CLIENT])])], False, ALLOW_P),
    Case("deny-miss-allows", [ap(action="DENY", rules=[src(principals=["a.b/ns/x/sa/y"])])], True, ""),
    Case(
        "deny-beats-allow",
        [ap("a", rules=[{}]), ap("d", action="DENY", rules=[src(namespaces=["front"])])],
        False,
        "shop/d",
    ),
    Case(
        "deny-not-namespaces-plaintext",
        [ap(action="DENY", rules=[src(notNamespaces=["front"])])],
        False,
        ALLOW_P,
        {"principal": NO},
    ),
    Case("audit-flags", [ap("a", action="AUDIT", rules=[src(namespaces=["front"])])], True, "", audited=True),
    Case("audit-miss", [ap("a", action="AUDIT", rules=[src(namespaces=["x"])])], True, "", audited=False),
    Case(
        "audit-with-deny",
        [ap("a", action="AUDIT", rules=[{}]), ap("d", action="DENY", rules=[{}])],
        False,
        "shop/d",
    ),
    Case(
        "audit-with-allow",
        [ap("a", action="AUDIT", rules=[{}]), ap("b", rules=[{}])],
        True,
        "shop/b",
        audited=True,
    ),
    Case(
        "audit-is-not-allow",
        [ap("a", action="AUDIT", rules=[{}]), ap("b", rules=[src(namespaces=["x"])])],
        False,
        "",
        audited=True,
    ),
    # -- scope ----------------------------------------------------------------------------------------
    Case("selector-applies", [ap(action="DENY", selector={"app": "web"}, rules=[{}])], False, ALLOW_P),
    Case("selector-other-workload", [ap(action="DENY", selector={"app": "db"}, rules=[{}])], True, ""),
    Case("namespace-scope-db", [ap(action="DENY", rules=[{}])], False, ALLOW_P, {"dst": "shop/db"}),
    Case("namespace-scope-other-ns", [ap(action="DENY", rules=[{}])], True, "", {"dst": "other/api"}),
    Case(
        "mesh-scope",
        [ap(action="DENY", ns="istio-system", rules=[{}])],
        False,
        "istio-system/p",
        {"dst": "other/api"},
    ),
    Case(
        "root-selector-all-namespaces",
        [ap(action="DENY", ns="istio-system", selector={"app": "web"}, rules=[{}])],
        False,
        "istio-system/p",
        {"dst": "other/api"},
    ),
    Case(
        "root-selector-miss",
        [ap(action="DENY", ns="istio-system", selector={"app": "web"}, rules=[{}])],
        True,
        "",
        {"dst": "shop/db"},
    ),
    Case("allow-elsewhere-no-effect", [ap(selector={"app": "db"}, rules=[src(namespaces=["x"])])], True, ""),
    Case(
        "custom-root-namespace",
        [mesh(rootNamespace="mesh-root"), ap(action="DENY", ns="mesh-root", rules=[{}])],
        False,
        "mesh-root/p",
        {"dst": "other/api"},
    ),
    Case(
        "unknown-workload-namespace-scope",
        [ap(action="DENY", rules=[{}])],
        False,
        ALLOW_P,
        {"dst": "shop/ghost"},
    ),
    Case("ambit-api-version", [ap(action="DENY", rules=[{}], api="ambit.io/v1")], False, ALLOW_P),
    # -- default deny ---------------------------------------------------------------------------------
    Case("default-deny", [mesh(defaultDeny=True)], False, "", reason="defaultDeny"),
    Case(
        "default-deny-allow-match",
        [mesh(defaultDeny=True), ap(rules=[src(namespaces=["front"])])],
        True,
        ALLOW_P,
    ),
    Case(
        "default-deny-deny-policy-only",
        [mesh(defaultDeny=True), ap(action="DENY", rules=[src(namespaces=["x"])])],
        False,
        "",
    ),
    Case("default-deny-off", [mesh(defaultDeny=False)], True, ""),
    # -- dry run --------------------------------------------------------------------------------------
    Case(
        "dry-run-deny",
        [ap(action="DENY", rules=[{}], dry_run=True)],
        True,
        "",
        dry_run=True,
        reason="would deny",
    ),
    Case("dry-run-allow-miss", [ap(rules=[src(namespaces=["x"])], dry_run=True)], True, "", dry_run=True),
    Case("dry-run-no-change", [ap(action="DENY", rules=[src(namespaces=["x"])], dry_run=True)], True, ""),
    Case(
        "dry-run-would-allow",
        [mesh(defaultDeny=True), ap(rules=[{}], dry_run=True)],
        False,
        "",
        dry_run=True,
        reason="would allow",
    ),
    # -- Rego -----------------------------------------------------------------------------------------
    Case("rego-allow", [rego(REGO_PORTS)], True, "shop/r", reason="web port"),
    Case("rego-deny", [rego(REGO_PORTS)], False, "shop/r", {"port": 81}, reason="port not allowed"),
    Case("rego-deny-beats-allow-policy", [rego(REGO_PORTS), ap(rules=[{}])], False, "shop/r", {"port": 81}),
    Case("rego-allow-counts-as-allow", [rego(REGO_PORTS), ap(rules=[src(namespaces=["x"])])], True, "shop/r"),
    Case("deny-beats-rego-allow", [rego(REGO_PORTS), ap(action="DENY", rules=[{}])], False, ALLOW_P),
    Case("rego-selector-miss", [rego(REGO_PORTS, selector={"app": "db"})], True, "", {"port": 81}),
    Case("rego-eval-error", [rego(REGO_CONFLICT)], False, "shop/r", {"port": 9999}, reason="fail closed"),
    Case("rego-eval-ok-elsewhere", [rego(REGO_CONFLICT)], True, "shop/r", {"port": 2000}),
    Case("rego-undefined", [rego(REGO_NO_DEFAULT)], False, "shop/r", reason="undefined"),
    Case(
        "rego-plaintext-input",
        [rego(REGO_PLAINTEXT)],
        False,
        "shop/r",
        {"principal": NO},
        reason="plaintext from 10.0.0.5",
    ),
    Case("rego-bool-query", [rego(REGO_BOOL, query="data.ambit.allow")], True, "shop/r"),
    Case(
        "rego-bool-query-deny",
        [rego(REGO_BOOL, query="data.ambit.allow")],
        False,
        "shop/r",
        {"principal": "cluster.local/ns/back/sa/x"},
    ),
    Case("rego-labels", [rego(REGO_LABELS, ns="istio-system")], False, "istio-system/r", {"dst": "shop/db"}),
    # -- root namespace: Istio's istio-system by default, MeshConfig overrides --------------------------
    Case(
        "root-default-istio-system",
        [ap(action="DENY", ns="istio-system", rules=[{}])],
        False,
        "istio-system/p",
        {"dst": "shop/db"},
    ),
    Case(
        "ambit-system-is-not-root",
        [ap(action="DENY", ns="ambit-system", rules=[{}])],
        True,
        "",
        {"dst": "other/api"},
    ),
    Case(
        "root-override-leaves-istio-system",
        [mesh(rootNamespace="mesh-root"), ap(action="DENY", ns="istio-system", rules=[{}])],
        True,
        "",
        {"dst": "other/api"},
    ),
    Case(
        "root-override-ambit-system",
        [mesh(rootNamespace="ambit-system"), ap(action="DENY", ns="ambit-system", rules=[{}])],
        False,
        "ambit-system/p",
        {"dst": "other/api"},
    ),
    Case(
        "root-allow-mesh-wide",
        [ap(ns="istio-system", rules=[src(namespaces=["x"])])],
        False,
        "",
        {"dst": "other/api"},
        reason="no ALLOW policy matched",
    ),
    # -- istio.io/dry-run annotation ----------------------------------------------------------------------
    Case(
        "annotation-dry-run-deny",
        [ap(action="DENY", rules=[{}], annotations={DRY: "true"})],
        True,
        "",
        dry_run=True,
        reason="dry-run: shop/p would deny",
    ),
    *[
        Case(
            f"annotation-dry-run-{v}",
            [ap(action="DENY", rules=[{}], annotations={DRY: v})],
            True,
            "",
            dry_run=True,
        )
        for v in ("True", "1", "t", "TRUE")
    ],
    Case(
        "annotation-dry-run-false",
        [ap(action="DENY", rules=[{}], annotations={DRY: "false"})],
        False,
        ALLOW_P,
    ),
    Case(
        "annotation-dry-run-allow",
        [mesh(defaultDeny=True), ap(rules=[{}], annotations={DRY: "true"})],
        False,
        "",
        dry_run=True,
        reason="would allow",
    ),
    Case(
        "annotation-dry-run-allow-nothing",
        [ap(rules=None, annotations={DRY: "true"})],
        True,
        "",
        dry_run=True,
        reason="would deny",
    ),
    Case(
        "annotation-dry-run-and-spec-agree",
        [ap(action="DENY", rules=[{}], dry_run=True, annotations={DRY: "true"})],
        True,
        "",
        dry_run=True,
    ),
    Case(
        "annotation-other-ignored", [ap(action="DENY", rules=[{}], annotations={"team": "a"})], False, ALLOW_P
    ),
    # -- serviceAccounts / notServiceAccounts ("ns/sa"; a bare name is the policy's namespace) -------------
    Case("sa-match", [ap(rules=[src(serviceAccounts=["front/client"])])], True, ALLOW_P),
    Case("sa-miss", [ap(rules=[src(serviceAccounts=["front/other"])])], False, ""),
    Case("sa-list-or", [ap(rules=[src(serviceAccounts=["a/b", "front/client"])])], True, ALLOW_P),
    Case("sa-bare-is-policy-namespace", [ap(rules=[src(serviceAccounts=["client"])])], False, ""),
    Case(
        "sa-bare-match",
        [ap(rules=[src(serviceAccounts=["client"])])],
        True,
        ALLOW_P,
        {"principal": "cluster.local/ns/shop/sa/client"},
    ),
    Case("sa-plaintext", [ap(rules=[src(serviceAccounts=["front/client"])])], False, "", {"principal": NO}),
    Case(
        "sa-node-identity",
        [ap(rules=[src(serviceAccounts=["node/node-2"])])],
        False,
        "",
        {"principal": "cluster.local/node/node-2"},
    ),
    Case(
        "sa-any-trust-domain",
        [ap(rules=[src(serviceAccounts=["front/client"])])],
        True,
        ALLOW_P,
        {"principal": "example.org/ns/front/sa/client"},
        td="example.org",
    ),
    Case(
        "sa-and-ip", [ap(rules=[src(serviceAccounts=["front/client"], ipBlocks=["192.168.0.0/16"])])], False
    ),
    Case("not-sa-excluded", [ap(rules=[src(notServiceAccounts=["front/client"])])], False, ""),
    Case("not-sa-other", [ap(rules=[src(notServiceAccounts=["front/x"])])], True, ALLOW_P),
    Case(
        "not-sa-plaintext",
        [ap(rules=[src(notServiceAccounts=["front/client"])])],
        True,
        ALLOW_P,
        {"principal": NO},
    ),
    Case("deny-sa", [ap(action="DENY", rules=[src(serviceAccounts=["front/client"])])], False, ALLOW_P),
    Case("deny-sa-miss", [ap(action="DENY", rules=[src(serviceAccounts=["back/client"])])], True, ""),
    # -- L7 attributes in ALLOW: the rule never matches (ztunnel), other rules still do ---------------------
    Case(
        "allow-methods-never",
        [ap(rules=[{**src(namespaces=["front"]), **op(methods=["GET"])}])],
        False,
        "",
        reason="no ALLOW policy matched",
    ),
    Case("allow-methods-with-ports", [ap(rules=[op(ports=["80"], methods=["GET"])])], False, ""),
    Case("allow-not-methods", [ap(rules=[op(notMethods=["DELETE"])])], False, ""),
    Case("allow-paths", [ap(rules=[op(paths=["/api/*"])])], False, "", {"principal": NO}),
    Case("allow-not-paths", [ap(rules=[op(notPaths=["/admin"])])], False, ""),
    Case("allow-hosts", [ap(rules=[op(hosts=["web.shop.svc.cluster.local"])])], False, ""),
    Case("allow-not-hosts", [ap(rules=[op(notHosts=["evil.example"])])], False, ""),
    Case("allow-request-principals", [ap(rules=[src(requestPrincipals=["*"])])], False, ""),
    Case("allow-not-request-principals", [ap(rules=[src(notRequestPrincipals=["x/y"])])], False, ""),
    Case("allow-remote-ip-blocks", [ap(rules=[src(remoteIpBlocks=["10.0.0.0/8"])])], False, ""),
    Case("allow-when-header", [ap(rules=[when("request.headers[x-user]", "alice")])], False, ""),
    Case("allow-when-claims", [ap(rules=[when("request.auth.claims[iss]", "https://idp")])], False, ""),
    Case(
        "allow-when-request-principal", [ap(rules=[when("request.auth.principal", "idp/alice")])], False, ""
    ),
    Case("allow-when-audiences", [ap(rules=[when("request.auth.audiences", "web")])], False, ""),
    Case("allow-when-presenter", [ap(rules=[when("request.auth.presenter", "app")])], False, ""),
    Case("allow-when-remote-ip", [ap(rules=[when("remote.ip", "10.0.0.0/8")])], False, ""),
    Case("allow-when-sni", [ap(rules=[when("connection.sni", "web.example")])], False, ""),
    Case("allow-when-envoy-filter", [ap(rules=[when("experimental.envoy.filters.a.b[c]", "d")])], False, ""),
    Case(
        "allow-l7-rule-dropped-l4-rule-kept",
        [ap(rules=[op(methods=["GET"]), src(namespaces=["front"])])],
        True,
        ALLOW_P,
    ),
    Case("allow-ports-stay-l4", [ap(rules=[op(ports=["80"])])], True, ALLOW_P),
    # -- L7 attributes in DENY: enforced on their L4 part (fail closed), an L7-only entry matches all --
    Case(
        "deny-methods-l4-part",
        [ap(action="DENY", rules=[op(ports=["80"], methods=["GET"])])],
        False,
        ALLOW_P,
        reason="L4 part",
    ),
    Case(
        "deny-methods-l4-part-miss",
        [ap(action="DENY", rules=[op(ports=["80"], methods=["GET"])])],
        True,
        "",
        {"port": 8080},
    ),
    Case("deny-methods-only", [ap(action="DENY", rules=[op(methods=["POST"])])], False, ALLOW_P, {"port": 9}),
    Case(
        "deny-paths-plaintext",
        [ap(action="DENY", rules=[op(paths=["/admin"])])],
        False,
        ALLOW_P,
        {"principal": NO},
    ),
    Case(
        "deny-mixed-to-list",
        [
            ap(
                action="DENY",
                rules=[{"to": [{"operation": {"methods": ["GET"]}}, {"operation": {"ports": ["443"]}}]}],
            )
        ],
        False,
        ALLOW_P,
    ),
    Case(
        "deny-request-principals-and-namespace",
        [ap(action="DENY", rules=[src(namespaces=["front"], requestPrincipals=["*"])])],
        False,
        ALLOW_P,
    ),
    Case(
        "deny-request-principals-and-namespace-miss",
        [ap(action="DENY", rules=[src(namespaces=["back"], requestPrincipals=["*"])])],
        True,
        "",
    ),
    Case(
        "deny-not-request-principals-only",
        [ap(action="DENY", rules=[src(notRequestPrincipals=["*"])])],
        False,
        ALLOW_P,
    ),
    Case(
        "deny-remote-ip-and-ip",
        [ap(action="DENY", rules=[src(ipBlocks=["10.9.0.0/16"], remoteIpBlocks=["1.2.3.4"])])],
        True,
        "",
    ),
    Case(
        "deny-when-header-and-port",
        [DENY_HEADER_AND_PORT],
        False,
        ALLOW_P,
    ),
    Case(
        "deny-when-header-and-port-miss",
        [DENY_HEADER_AND_PORT],
        True,
        "",
        {"port": 8080},
    ),
    Case(
        "deny-when-header-only",
        [ap(action="DENY", rules=[when("request.headers[x-user]", "a")])],
        False,
        ALLOW_P,
    ),
    Case(
        "deny-l7-and-allow",
        [ap("a", rules=[{}]), ap("d", action="DENY", rules=[op(methods=["GET"])])],
        False,
        "shop/d",
    ),
    Case(
        "audit-l7-l4-part",
        [ap("a", action="AUDIT", rules=[op(ports=["80"], paths=["/x"])])],
        True,
        "",
        audited=True,
    ),
    Case(
        "dry-run-deny-l7",
        [ap(action="DENY", rules=[op(methods=["GET"])], annotations={DRY: "true"})],
        True,
        "",
        dry_run=True,
        reason="would deny",
    ),
    # -- targetRef(s): a waypoint's policy, not enforced by the node ----------------------------------------
    Case(
        "target-refs-allow-not-enforced", [ap(rules=[src(namespaces=["x"])], targetRefs=[SVC_REF])], True, ""
    ),
    Case("target-ref-deny-not-enforced", [ap(action="DENY", rules=[{}], targetRef=SVC_REF)], True, ""),
    Case(
        "target-refs-gateway-not-enforced",
        [
            ap(
                action="DENY",
                rules=[{}],
                targetRefs=[{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
            )
        ],
        True,
        "",
    ),
    Case(
        "target-refs-default-deny",
        [mesh(defaultDeny=True), ap(rules=[{}], targetRefs=[SVC_REF])],
        False,
        "",
        reason="defaultDeny",
    ),
    Case(
        "target-refs-next-to-selector-policy",
        [ap("w", rules=[{}], targetRefs=[SVC_REF]), ap("d", action="DENY", rules=[{}])],
        False,
        "shop/d",
    ),
    # -- CUSTOM: no external authorizer on the node, so what it matches is denied (fail closed) -------------
    Case(
        "custom-denies-match",
        [ap(action="CUSTOM", provider=PROVIDER, rules=[op(ports=["80"])])],
        False,
        ALLOW_P,
        reason="CUSTOM",
    ),
    Case(
        "custom-miss-allows",
        [ap(action="CUSTOM", provider=PROVIDER, rules=[op(ports=["80"])])],
        True,
        "",
        {"port": 8080},
    ),
    Case(
        "custom-paths-l4-part",
        [ap(action="CUSTOM", provider=PROVIDER, rules=[op(paths=["/admin/*"])])],
        False,
        ALLOW_P,
        {"principal": NO},
    ),
    Case(
        "custom-before-allow",
        [ap("a", rules=[{}]), ap("c", action="CUSTOM", provider=PROVIDER, rules=[{}])],
        False,
        "shop/c",
        reason="fail closed",
    ),
    Case(
        "custom-before-deny",
        [ap("a", action="DENY", rules=[{}]), ap("c", action="CUSTOM", provider=PROVIDER, rules=[{}])],
        False,
        "shop/c",
    ),
    Case(
        "custom-ip-blocks",
        [ap(action="CUSTOM", provider=PROVIDER, rules=[src(ipBlocks=["10.0.0.0/24"])])],
        False,
        ALLOW_P,
    ),
    Case(
        "custom-target-refs-not-enforced",
        [ap(action="CUSTOM", provider=PROVIDER, rules=[{}], targetRefs=[SVC_REF])],
        True,
        "",
    ),
    Case(
        "custom-root-selector",
        [ap(action="CUSTOM", ns="istio-system", selector={"app": "web"}, provider=PROVIDER, rules=[{}])],
        False,
        "istio-system/p",
        {"dst": "other/api"},
    ),
    Case(
        "custom-root-selector-miss",
        [ap(action="CUSTOM", ns="istio-system", selector={"app": "web"}, provider=PROVIDER, rules=[{}])],
        True,
        "",
        {"dst": "shop/db"},
    ),
]


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decision(case: Case) -> None:
    engine = engine_with(case.docs, td=case.td)
    attrs = case.attrs
    decision = engine.authorize(conn(**attrs))
    assert decision.allow is case.allow, decision
    if case.policy is not None:
        assert decision.policy == case.policy, decision
    assert decision.audited is case.audited, decision
    assert decision.dry_run is case.dry_run, decision
    assert case.reason in decision.reason, decision
    assert engine.denies(conn(**attrs)) is (not case.allow)


# -- enrolment: istio.io/dataplane-mode and ambit.io/dataplane-mode on Namespaces and Workloads -------------
ISTIO_MODE = "istio.io/dataplane-mode"
AMBIT_MODE = "ambit.io/dataplane-mode"


@dataclass(frozen=True)
class Enrol:
    id: str
    namespace: dict[str, str] | None  # the Namespace's labels; None: no Namespace object declared
    workload: dict[str, str]
    enrolled: bool


ENROLMENT = [
    Enrol("istio-namespace", {ISTIO_MODE: "ambient"}, {}, True),
    Enrol("ambit-namespace", {AMBIT_MODE: "ambient"}, {}, True),
    Enrol("istio-workload", {}, {ISTIO_MODE: "ambient"}, True),
    Enrol("ambit-workload", {}, {AMBIT_MODE: "ambient"}, True),
    Enrol("workload-without-namespace-object", None, {ISTIO_MODE: "ambient"}, True),
    Enrol("nothing", {}, {}, False),
    Enrol("no-namespace-object", None, {}, False),
    Enrol("istio-opt-out", {ISTIO_MODE: "ambient"}, {ISTIO_MODE: "none"}, False),
    Enrol("ambit-opt-out-istio-namespace", {ISTIO_MODE: "ambient"}, {AMBIT_MODE: "none"}, False),
    Enrol("istio-opt-out-ambit-namespace", {AMBIT_MODE: "ambient"}, {ISTIO_MODE: "none"}, False),
    Enrol("workload-ambient-over-namespace-none", {ISTIO_MODE: "none"}, {ISTIO_MODE: "ambient"}, True),
    Enrol("namespace-none", {ISTIO_MODE: "none"}, {}, False),
    Enrol("workload-conflict-none-wins", {}, {ISTIO_MODE: "ambient", AMBIT_MODE: "none"}, False),
    Enrol("workload-conflict-none-wins-2", {}, {ISTIO_MODE: "none", AMBIT_MODE: "ambient"}, False),
    Enrol("namespace-conflict-none-wins", {ISTIO_MODE: "ambient", AMBIT_MODE: "none"}, {}, False),
    Enrol("both-labels-agree", {ISTIO_MODE: "ambient", AMBIT_MODE: "ambient"}, {}, True),
    Enrol("unknown-value-is-unset", {ISTIO_MODE: "ambient"}, {ISTIO_MODE: "sidecar"}, True),
    Enrol("case-matters", {ISTIO_MODE: "Ambient"}, {}, False),
    Enrol("other-istio-label", {"istio-injection": "enabled"}, {}, False),
]  # fmt: skip


@pytest.mark.parametrize("case", ENROLMENT, ids=[c.id for c in ENROLMENT])
def test_enrolment(case: Enrol) -> None:
    """Parsed from the YAML Kubernetes and Istio use (a v1 Namespace), decided by the agent's rule."""
    docs: list[dict[str, Any]] = []
    if case.namespace is not None:
        docs.append(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "app", "labels": case.namespace}}
        )
    docs.append(
        {
            "apiVersion": "ambit.io/v1",
            "kind": "Workload",
            "metadata": {"name": "w", "namespace": "app", "labels": case.workload},
            "spec": {"serviceAccount": "w", "node": "node-1", "ips": ["10.244.1.9"]},
        }
    )
    snap = MeshSnapshot.from_objects(1, TD, "node-1", [parse(d, "test") for d in docs])
    w = snap.workloads["app/w"]
    assert w.enrolled(snap.namespace_of(w)) is case.enrolled
    wanted = enrolment.desired([w], lambda x: x.enrolled(snap.namespace_of(x)), lambda x: "PERMISSIVE")
    assert ("10.244.1.9" in wanted) is case.enrolled
