"""PolicyEngine behaviour around decisions: updates (rejected ones keep the previous set), Rego cache,
audit records, counters, rows, re-checking established connections, and PeerAuthentication precedence."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
from test_policy_table import REGO_PORTS, SVC_REF, ap, conn, engine_with, mesh, op, pa, rego, snapshot, src

from agent.policy.engine import PolicyEngine
from agent.policy.errors import PolicyError

BAD_REGO = "package ambit\nimport rego.v1\nauthz := {"
UNKNOWN_FUNCTION = 'package ambit\nimport rego.v1\nauthz := {"allow": nope(input.source_ip), "reason": ""}\n'


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        ([rego(BAD_REGO, name="broken")], "RegoPolicy shop/broken: module does not compile"),
        ([rego(UNKNOWN_FUNCTION, name="nofn")], "RegoPolicy shop/nofn: evaluation of a probe input fails"),
        ([rego("package ambit\nauthz := 5\n", name="five")], "result must be a bool"),
        ([mesh(), {**mesh(), "metadata": {"name": "second"}}], "more than one MeshConfig"),
        ([mesh(trustDomain="other.org")], "trustDomain 'other.org' differs"),
    ],
    ids=["rego-syntax", "rego-unknown-function", "rego-bad-result", "two-meshconfigs", "trust-domain"],
)
def test_invalid_update_rejected_and_previous_set_stays(docs: list[dict[str, Any]], message: str) -> None:
    engine = engine_with([ap(action="DENY", rules=[src(namespaces=["front"])])])
    assert not engine.authorize(conn()).allow
    with pytest.raises(PolicyError) as exc:
        engine.update(snapshot(docs, version=2))
    assert message in str(exc.value)
    assert engine.version == 1
    assert not engine.authorize(conn()).allow  # the DENY of version 1 still applies
    assert engine.counters()["updates_rejected"] == 1
    with pytest.raises(PolicyError):
        engine.validate(snapshot(docs, version=2))


def test_validate_does_not_apply() -> None:
    engine = engine_with([])
    snap = snapshot([ap(action="DENY", rules=[{}])], version=2)
    engine.validate(snap)
    assert engine.authorize(conn()).allow and engine.version == 1
    validated = engine._validated
    engine.update(snap)  # the relay's order: validate, then update with the same snapshot
    assert validated is not None and engine._config is validated[1]
    assert not engine.authorize(conn()).allow


def test_rego_cache_hits_and_invalidation_on_update() -> None:
    engine = engine_with([rego(REGO_PORTS)])
    for _ in range(3):
        assert engine.authorize(conn()).allow
    c = engine.counters()
    assert (c["rego_cache_misses"], c["rego_cache_hits"], c["rego_cache_entries"]) == (1, 2, 1)
    # New version: same name, different module. The cached allow must not survive.
    deny_all = 'package ambit\nimport rego.v1\nauthz := {"allow": false, "reason": "closed"}\n'
    engine.update(snapshot([rego(deny_all)], version=2))
    assert engine.counters()["rego_cache_entries"] == 0
    d = engine.authorize(conn())
    assert not d.allow and "closed" in d.reason
    assert engine.counters()["rego_cache_misses"] == 2


def test_rego_errors_are_counted_and_deny() -> None:
    conflict = (
        "package ambit\nimport rego.v1\n"
        'default authz := {"allow": true, "reason": "d"}\n'
        'authz := {"allow": true, "reason": "a"} if input.destination_port > 1000\n'
        'authz := {"allow": false, "reason": "b"} if input.destination_port == 9999\n'
    )
    engine = engine_with([rego(conflict)])
    for _ in range(2):
        d = engine.authorize(conn(port=9999))
        assert not d.allow and "fail closed" in d.reason
    assert engine.counters()["rego_errors"] == 2


def test_policy_change_denies_established_connections() -> None:
    engine = engine_with([])
    live = [conn(), conn(principal="cluster.local/ns/back/sa/x"), conn(port=443)]
    assert not any(engine.denies(a) for a in live)
    engine.update(snapshot([ap(action="DENY", rules=[src(namespaces=["back"])])], version=2))
    assert [engine.denies(a) for a in live] == [False, True, False]
    assert engine.counters()["allow"] == 0  # denies() is not counted as a decision
    revoked = engine.recheck(enumerate(live))
    assert [(i, d.policy) for i, d in revoked] == [(1, "shop/p")]
    assert engine.counters()["revoked"] == 1


def test_audit_records() -> None:
    records: list[dict[str, Any]] = []
    engine = engine_with(
        [
            ap("audit-front", action="AUDIT", rules=[src(namespaces=["front"])]),
            ap("deny-back", action="DENY", rules=[src(namespaces=["back"])]),
        ],
        audit=records.append,
    )
    engine.authorize(conn())  # allowed, audited
    engine.authorize(conn(principal="cluster.local/ns/back/sa/x"))  # denied
    engine.authorize(conn(principal="cluster.local/ns/other/sa/x"))  # allowed, not audited: no record
    assert [(r["decision"], r["policy"], r["audit_policy"]) for r in records] == [
        ("allow", "", "shop/audit-front"),
        ("deny", "shop/deny-back", ""),
    ]
    assert records[0]["source_principal"] == "spiffe://cluster.local/ns/front/sa/client"
    assert records[1]["config_version"] == 1 and records[1]["destination_port"] == 80
    c = engine.counters()
    assert (c["allow"], c["deny"], c["audited"]) == (2, 1, 1)


def test_audit_all_and_failing_sink() -> None:
    records: list[dict[str, Any]] = []
    engine = engine_with([], audit=records.append, audit_all=True)
    engine.authorize(conn())
    assert len(records) == 1 and records[0]["reason"] == "no ALLOW policy applies"

    def broken(record: dict[str, Any]) -> None:
        raise OSError("disk full")

    engine = engine_with([ap(action="DENY", rules=[{}])], audit=broken)
    assert not engine.authorize(conn()).allow  # the decision survives a failing audit sink
    assert engine.counters()["audit_errors"] == 1


def test_rows_and_counters() -> None:
    engine = engine_with(
        [
            mesh(defaultDeny=True),
            ap("web", selector={"app": "web"}, rules=[{}], dry_run=True),
            ap("mesh-deny", ns="istio-system", action="DENY", rules=[src(ipBlocks=["1.2.3.4"])]),
            pa(mode="STRICT", selector={"app": "web"}, ports={"8080": "DISABLE"}),
            rego(REGO_PORTS),
        ]
    )
    rows = {(r["kind"], r["name"]): r for r in engine.rows()}
    assert rows[("MeshConfig", "default")]["detail"].startswith("defaultDeny=true rootNamespace=istio-system")
    assert rows[("AuthorizationPolicy", "web")]["scope"] == "workload"
    assert rows[("AuthorizationPolicy", "web")]["detail"] == "ALLOW 1 rule(s) dry-run"
    assert rows[("AuthorizationPolicy", "mesh-deny")]["scope"] == "mesh"
    assert rows[("PeerAuthentication", "pa")]["detail"] == "mtls STRICT ports 8080=DISABLE"
    assert rows[("RegoPolicy", "r")]["detail"] == "rego query data.ambit.authz"
    c = engine.counters()
    assert (c["authorization_policies"], c["rego_policies"], c["default_deny"], c["version"]) == (2, 1, 1, 1)


WARNED = [
    ap("l7", rules=[op(methods=["GET"])]),
    ap("waypoint", rules=[{}], targetRefs=[SVC_REF]),
    ap("ext", action="CUSTOM", provider={"name": "authz"}, rules=[op(ports=["9"])]),
    ap("plain", action="DENY", rules=[src(namespaces=["x"])]),
]


def test_warnings_are_logged_once_listed_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="agent.policy.engine")
    engine = engine_with(WARNED)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3  # one each for waypoint, ext (CUSTOM) and l7; none for plain
    assert any(m.startswith("AuthorizationPolicy shop/waypoint: bound to targetRefs") for m in logged)
    rows = {r["name"]: r for r in engine.rows()}
    assert (
        rows["waypoint"]["scope"] == "waypoint (not enforced)"
        and rows["waypoint"]["selector"] == "Service/web"
    )
    assert rows["ext"]["detail"] == "CUSTOM 1 rule(s) provider authz"
    assert "never match at L4" in rows["l7"]["warnings"][0]
    assert rows["plain"]["warnings"] == []
    c = engine.counters()
    assert c["policy_warnings"] == 3 and c["authorization_policies"] == 3  # the waypoint one is not compiled
    caplog.clear()
    more = ap("more", rules=[{"when": [{"key": "connection.sni", "values": ["a"]}]}])
    engine.update(snapshot([*WARNED, more], version=2))
    assert [r.getMessage() for r in caplog.records] == [
        "AuthorizationPolicy shop/more: rule(s) 0 use L7 attributes (connection.sni) and never match at L4 "
        "(more restrictive than requested); use a waypoint for L7"
    ]  # only the new policy's warning: the others were logged already
    assert engine.counters()["policy_warnings"] == 4


def test_warnings_survive_a_workload_only_update() -> None:
    engine = engine_with(WARNED)
    snap = snapshot(WARNED, version=2)
    engine.update(snap.with_workloads([]))
    assert engine.version == 2 and engine.counters()["policy_warnings"] == 3


def test_unusable_attributes_fail_closed() -> None:
    engine = engine_with([ap(rules=[src(ipBlocks=["10.0.0.0/8"])])])
    d = engine.authorize(conn(ip="not-an-ip"))
    assert not d.allow


def test_internal_error_denies_and_never_raises() -> None:
    engine = engine_with([])
    broken = dataclasses.replace(conn(), source_principal="spiffe://not/parsed")  # type: ignore[arg-type]
    d = engine.authorize(broken)
    assert not d.allow and "fail closed" in d.reason
    assert engine.denies(broken) and engine.counters()["errors"] == 2


def test_concurrent_updates_and_decisions() -> None:
    engine = engine_with([])
    stop = threading.Event()
    failures: list[BaseException] = []

    def decide() -> None:
        try:
            while not stop.is_set():
                engine.authorize(conn())
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=decide) for _ in range(3)]
    for t in threads:
        t.start()
    for v in range(2, 40):
        engine.update(snapshot([ap(action="DENY", rules=[src(namespaces=[f"ns{v}"])])], version=v))
    stop.set()
    for t in threads:
        t.join()
    assert not failures and engine.counters()["errors"] == 0 and engine.version == 39


WEB = "shop/web"
MTLS_CASES = [
    ("default-permissive", [], WEB, 80, "PERMISSIVE"),
    ("meshconfig-default", [mesh(defaultMtlsMode="STRICT")], WEB, 80, "STRICT"),
    ("mesh-strict", [pa(ns="istio-system", mode="STRICT")], "other/api", 80, "STRICT"),
    (
        "namespace-over-mesh",
        [pa("m", ns="istio-system", mode="STRICT"), pa(mode="PERMISSIVE")],
        WEB,
        80,
        "PERMISSIVE",
    ),
    ("namespace-other-ns", [pa(ns="other", mode="STRICT")], WEB, 80, "PERMISSIVE"),
    (
        "workload-over-namespace",
        [pa("n", mode="DISABLE"), pa("w", mode="STRICT", selector={"app": "web"})],
        WEB,
        80,
        "STRICT",
    ),
    (
        "workload-selector-miss",
        [pa("n", mode="DISABLE"), pa("w", mode="STRICT", selector={"app": "db"})],
        WEB,
        80,
        "DISABLE",
    ),
    (
        "workload-unset-inherits",
        [pa("n", mode="STRICT"), pa("w", selector={"app": "web"}, ports={"8080": "DISABLE"})],
        WEB,
        80,
        "STRICT",
    ),
    (
        "port-level",
        [pa("w", mode="STRICT", selector={"app": "web"}, ports={"8080": "DISABLE"})],
        WEB,
        8080,
        "DISABLE",
    ),
    (
        "port-level-other-port",
        [pa("w", mode="STRICT", selector={"app": "web"}, ports={"8080": "DISABLE"})],
        WEB,
        80,
        "STRICT",
    ),
    (
        "port-unset-inherits",
        [pa("w", mode="STRICT", selector={"app": "web"}, ports={"8080": "UNSET"})],
        WEB,
        8080,
        "STRICT",
    ),
    ("same-scope-first-by-name", [pa("b", mode="DISABLE"), pa("a", mode="STRICT")], WEB, 80, "STRICT"),
    ("custom-root", [mesh(rootNamespace="root"), pa(ns="root", mode="STRICT")], "other/api", 80, "STRICT"),
    ("unknown-workload-namespace", [pa(mode="STRICT")], "shop/ghost", 80, "STRICT"),
]


@pytest.mark.parametrize(("case", "docs", "uid", "port", "mode"), MTLS_CASES, ids=[c[0] for c in MTLS_CASES])
def test_mtls_mode(case: str, docs: list[dict[str, Any]], uid: str, port: int, mode: str) -> None:
    engine = engine_with(docs)
    assert engine.mtls_mode(uid, port) == mode
    snap = snapshot(docs)
    if uid in snap.workloads:
        assert engine.mtls_mode(snap.workloads[uid], port) == mode


def test_mtls_mode_follows_updates() -> None:
    engine = PolicyEngine("cluster.local")
    assert engine.mtls_mode("shop/web", 80) == "PERMISSIVE"
    engine.update(snapshot([pa(mode="STRICT")]))
    assert engine.mtls_mode("shop/web", 80) == "STRICT"


def test_workload_only_update_reuses_compiled_policies_and_drops_memos() -> None:
    docs = [rego(REGO_PORTS), ap(action="DENY", rules=[src(namespaces=["back"])])]
    engine = engine_with(docs)
    assert engine.authorize(conn()).allow
    before = engine._config
    snap = snapshot(docs, version=2)
    extra = snapshot(docs).workloads["shop/web"]
    engine.update(snap.with_workloads([extra]))
    after = engine._config
    assert after.version == 2 and after.rego is before.rego and after.authz is before.authz
    assert after.rego_cache == {} and after.sets == {}
    assert engine.authorize(conn()).allow


def test_namespace_is_never_read_from_a_foreign_trust_domain() -> None:
    """`spiffe://evil.example/ns/front/...` signed by the same root is not namespace front: a namespace
    ALLOW does not match it (nor does a Rego policy see a namespace for it)."""
    engine = engine_with([ap(action="ALLOW", rules=[src(namespaces=["front"])])])
    assert engine.authorize(conn()).allow
    assert not engine.authorize(conn("evil.example/ns/front/sa/client")).allow
    deny_others = engine_with([ap(action="DENY", rules=[src(notNamespaces=["front"])])])
    assert not deny_others.authorize(conn("evil.example/ns/front/sa/client")).allow
    by_account = engine_with([ap(action="ALLOW", rules=[src(serviceAccounts=["front/client"])])])
    assert by_account.authorize(conn()).allow
    assert not by_account.authorize(conn("evil.example/ns/front/sa/client")).allow


def test_only_plain_allows_without_rego_are_reusable() -> None:
    """`reusable` (the proxy's inbound fast path accepts identical streams unasked when it says yes): a
    plain ALLOW, never a denial, an AUDIT match, a dry-run difference, a destination a RegoPolicy
    (enforced or dry-run) applies to, or an engine that audits every decision."""
    allow = [ap(action="ALLOW", rules=[src(namespaces=["front"])])]
    engine = engine_with(allow)
    d = engine.authorize(conn())
    assert d.allow and engine.reusable(conn(), d)
    assert not engine.reusable(conn(dst="shop/other"), d)  # not decided under this config
    denied = engine_with([ap(action="DENY", rules=[{}])])
    assert not denied.reusable(conn(), denied.authorize(conn()))
    audited = engine_with([*allow, ap(name="a", action="AUDIT", rules=[{}])])
    d = audited.authorize(conn())
    assert d.allow and d.audited and not audited.reusable(conn(), d)
    shadow = engine_with([*allow, ap(name="s", action="DENY", rules=[{}], dry_run=True)])
    d = shadow.authorize(conn())
    assert d.allow and d.dry_run and not shadow.reusable(conn(), d)
    with_rego = engine_with([*allow, rego(REGO_PORTS)])
    d = with_rego.authorize(conn())
    assert d.allow and not with_rego.reusable(conn(), d)
    all_audited = engine_with(allow, audit=lambda record: None, audit_all=True)
    d = all_audited.authorize(conn())
    assert d.allow and not all_audited.reusable(conn(), d)
    engine.update(snapshot([*allow, rego(REGO_PORTS)], version=2))  # a RegoPolicy arrives
    d = engine.authorize(conn())
    assert d.allow and not engine.reusable(conn(), d)
