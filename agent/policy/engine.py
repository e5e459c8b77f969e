"""The policy engine: compiles a mesh snapshot's policies at config time; decides per connection.

Order (Istio's): CUSTOM and DENY policies (CUSTOM denies what it matches: the node has no external
authorizer, so it fails closed), then RegoPolicies (a Rego deny is a DENY, a Rego allow an ALLOW match),
then AUDIT (flags the decision for the audit log), then ALLOW. No ALLOW policy applying to the workload
means allow, unless MeshConfig.defaultDeny. Any error while deciding denies (fail closed) with a reason.

A compiled config is immutable and swapped in with one reference assignment, so the relay thread can
update while proxy threads decide. Per-workload policy sets, Rego results and mTLS modes are memoised in
the compiled config, so a new config version invalidates them all at once.

Policies bound to a waypoint (`targetRefs`) are kept for `rows()` but not enforced. What the node enforces
differently from a policy's full meaning (L7 attributes, targetRefs, CUSTOM) is that policy's warnings:
logged once when they appear, listed by `rows()`, counted (`policy_warnings`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from agent.policy.compiled import CompiledPolicy, Peer, applies, compile_policy
from agent.policy.decision import ConnectionAttrs, Decision
from agent.policy.errors import PolicyError
from agent.policy.peerauth import PeerAuthIndex
from agent.policy.rego import RegoEvalError, RegoModule
from api.resources import Meta
from api.resources.policy import (
    AuthorizationPolicy,
    MeshConfig,
    PeerAuthentication,
    RegoPolicy,
)
from api.resources.workload import Workload

log = logging.getLogger(__name__)

REGO_CACHE_MAX = 65536  # entries per config version; cleared when full (bounded memory under scans)
DEFAULT_MESH = MeshConfig(Meta("default"))


class Snapshot(Protocol):
    """What the engine reads of agent.state.MeshSnapshot."""

    @property
    def version(self) -> int: ...
    @property
    def workloads(self) -> Mapping[str, Workload]: ...
    @property
    def policies(self) -> tuple[Any, ...]: ...


@dataclass(frozen=True)
class PolicySet:
    """The policies that apply to one workload, split by action, in evaluation order."""

    deny: tuple[CompiledPolicy, ...]
    audit: tuple[CompiledPolicy, ...]
    allow: tuple[CompiledPolicy, ...]
    rego: tuple[RegoModule, ...]
    otherwise: Decision  # when nothing matched: no ALLOW matched, or the mesh default


@dataclass
class CompiledConfig:
    version: int
    mesh: MeshConfig
    authz: tuple[CompiledPolicy, ...]
    rego: tuple[RegoModule, ...]
    peerauth: PeerAuthIndex
    workloads: Mapping[str, Workload]
    sources: tuple[Any, ...]  # the parsed objects, for rows()
    warnings: Mapping[str, tuple[str, ...]]  # policy uid -> what the node enforces differently (rows())
    # memo: workload uid -> (enforced set, set with dry-run policies enforced or None when there are none)
    sets: dict[str, tuple[PolicySet, PolicySet | None]] = field(default_factory=dict)
    rego_cache: dict[tuple[int, ConnectionAttrs], Decision] = field(default_factory=dict)
    mtls: dict[tuple[str, int], str] = field(default_factory=dict)


def compile_config(snapshot: Snapshot, trust_domain: str) -> CompiledConfig:
    """Compile every policy of the snapshot; PolicyError names the first invalid one."""
    policies = tuple(snapshot.policies)
    meshes = [p for p in policies if isinstance(p, MeshConfig)]
    if len(meshes) > 1:
        names = ", ".join(sorted(m.meta.name for m in meshes))
        raise PolicyError(f"more than one MeshConfig ({names}): the mesh-wide settings are ambiguous")
    mesh = meshes[0] if meshes else DEFAULT_MESH
    if mesh.trust_domain is not None and mesh.trust_domain != trust_domain:
        raise PolicyError(
            f"MeshConfig {mesh.meta.name}: trustDomain {mesh.trust_domain!r} differs from this agent's "
            f"trust domain {trust_domain!r}"
        )
    authz = []
    rego = []
    warnings = {}
    for p in sorted(policies, key=lambda p: (p.kind, p.meta.namespace, p.meta.name)):
        try:
            if isinstance(p, AuthorizationPolicy):
                if p.warnings:
                    warnings[p.uid] = p.warnings
                if p.enforced_by_node:
                    authz.append(compile_policy(p, trust_domain))
            elif isinstance(p, RegoPolicy):
                rego.append(RegoModule(p))
        except PolicyError:
            raise
        except Exception as exc:
            raise PolicyError(f"{p.kind} {p.uid}: cannot compile: {exc}") from exc
    peerauth = PeerAuthIndex(
        (p for p in policies if isinstance(p, PeerAuthentication)),
        mesh.root_namespace,
        mesh.default_mtls_mode,
    )
    return CompiledConfig(
        snapshot.version, mesh, tuple(authz), tuple(rego), peerauth, snapshot.workloads, policies, warnings
    )


def _select(config: CompiledConfig, namespace: str, labels: Mapping[str, str], dry_run: bool) -> PolicySet:
    root = config.mesh.root_namespace
    chosen = [
        p
        for p in config.authz
        if (dry_run or not p.dry_run) and applies(p.namespace, p.selector, root, namespace, labels)
    ]
    allow = tuple(p for p in chosen if p.action == "ALLOW")
    if allow:
        otherwise = Decision(False, "", f"no ALLOW policy matched ({len(allow)} apply)")
    elif config.mesh.default_deny:
        otherwise = Decision(False, "", "no ALLOW policy applies and MeshConfig defaultDeny is on")
    else:
        otherwise = Decision(True, "", "no ALLOW policy applies")
    return PolicySet(
        deny=tuple(p for p in chosen if p.action == "CUSTOM")
        + tuple(p for p in chosen if p.action == "DENY"),
        audit=tuple(p for p in chosen if p.action == "AUDIT"),
        allow=allow,
        rego=tuple(r for r in config.rego if applies(r.namespace, r.selector, root, namespace, labels)),
        otherwise=otherwise,
    )


def _workload_facts(config: CompiledConfig, uid: str, namespace: str) -> tuple[str, Mapping[str, str]]:
    w = config.workloads.get(uid)
    if w is None:  # not (yet) known: only namespace- and mesh-scoped policies can apply
        return namespace or uid.partition("/")[0], {}
    return w.namespace, w.labels


def rego_input(attrs: ConnectionAttrs, labels: Mapping[str, str], trust_domain: str) -> dict[str, Any]:
    """The Rego `input` document: the connection attributes, plus what follows from them."""
    sp = attrs.source_principal
    ours = sp is not None and sp.trust_domain == trust_domain  # no namespace from a foreign domain's ID
    return {
        "source_principal": str(sp) if sp is not None else None,
        "source_namespace": sp.namespace if ours and sp is not None else None,
        "source_service_account": sp.service_account if ours and sp is not None else None,
        "source_ip": attrs.source_ip,
        "destination_ip": attrs.destination_ip,
        "destination_port": attrs.destination_port,
        "destination_workload": attrs.destination_workload,
        "destination_namespace": attrs.destination_namespace,
        "destination_labels": dict(labels),
        "tls": attrs.tls,
        "trust_domain": trust_domain,
    }


class PolicyEngine:
    """Thread-safe: `update` from the relay thread, `authorize`/`mtls_mode` from any thread."""

    def __init__(
        self,
        trust_domain: str,
        audit: Callable[[dict[str, Any]], None] | None = None,
        audit_all: bool = False,
    ) -> None:
        self.trust_domain = trust_domain
        self._audit = audit
        self._audit_all = audit_all  # False: only denials, AUDIT matches and dry-run differences
        self._config = compile_config(_EmptySnapshot(), trust_domain)
        self._validated: tuple[Snapshot, CompiledConfig] | None = None
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "allow",
                "deny",
                "audited",
                "dry_run",
                "rego_cache_hits",
                "rego_cache_misses",
                "rego_errors",
                "errors",
                "audit_errors",
                "updates",
                "updates_rejected",
                "revoked",
            ),
            0,
        )

    # -- configuration ------------------------------------------------------------------------------
    def validate(self, snapshot: Snapshot) -> None:
        """Raise PolicyError if the snapshot's policies do not compile (the relay's `validate` hook).
        The result is kept, so the update() of the same snapshot that follows does not compile twice."""
        self._validated = (snapshot, compile_config(snapshot, self.trust_domain))

    def update(self, snapshot: Snapshot) -> None:
        """Compile and swap in the snapshot's policies; on PolicyError the previous set stays in force."""
        previous = self._config
        try:
            validated, self._validated = self._validated, None
            if validated is not None and validated[0] is snapshot:
                config = validated[1]
            elif tuple(snapshot.policies) == previous.sources:
                # Only workloads changed (an on-demand lookup): keep the compiled policies, drop the memos.
                config = CompiledConfig(
                    snapshot.version,
                    previous.mesh,
                    previous.authz,
                    previous.rego,
                    previous.peerauth,
                    snapshot.workloads,
                    previous.sources,
                    previous.warnings,
                )
            else:
                config = compile_config(snapshot, self.trust_domain)
        except PolicyError as exc:
            self._count("updates_rejected")
            log.warning("policy update to version %s rejected: %s", snapshot.version, exc)
            raise
        self._config = config
        self._count("updates")
        for uid, texts in config.warnings.items():  # once per warning: config changes are human-paced
            for text in texts:
                if text not in previous.warnings.get(uid, ()):
                    log.warning("AuthorizationPolicy %s: %s", uid, text)
        log.info(
            "policies version %s: %d authorization, %d rego",
            config.version,
            len(config.authz),
            len(config.rego),
        )

    @property
    def version(self) -> int:
        return self._config.version

    # -- decisions ----------------------------------------------------------------------------------
    def authorize(self, attrs: ConnectionAttrs) -> Decision:
        """The decision for one inbound connection. Never raises: an internal error denies."""
        config = self._config
        decision = self._decide_or_deny(config, attrs)
        with self._lock:
            counts = self._counts
            counts["allow" if decision.allow else "deny"] += 1
            if decision.audited:
                counts["audited"] += 1
            if decision.dry_run:
                counts["dry_run"] += 1
        if self._audit is not None and (
            self._audit_all or not decision.allow or decision.audited or decision.dry_run
        ):
            self._emit(config, attrs, decision)
        return decision

    def reusable(self, attrs: ConnectionAttrs, decision: Decision) -> bool:
        """Whether `decision` (this engine's for `attrs`) is what an identical connection gets until the
        next update: a plain ALLOW (no AUDIT match, no dry-run difference: those are audited per
        connection), no RegoPolicy applying to the destination, enforced or dry-run (its module is other
        people's code, judged per connection), and no audit of every decision. The proxy's inbound fast
        path relies on it; a workload not decided under the current config says no."""
        if not decision.allow or decision.audited or decision.dry_run or self._audit_all:
            return False
        sets = self._config.sets.get(attrs.destination_workload)
        return sets is not None and not sets[0].rego and (sets[1] is None or not sets[1].rego)

    def denies(self, attrs: ConnectionAttrs) -> bool:
        """Whether the current policies deny an (established) connection; not counted, not audited."""
        return not self._decide_or_deny(self._config, attrs).allow

    def recheck(self, connections: Iterable[tuple[int, ConnectionAttrs]]) -> list[tuple[int, Decision]]:
        """The live connections (id, attrs) the current policies deny, with the denying decision: after
        update(), the proxy closes these (e.g. `proxy.close(conn_id, decision.reason)`)."""
        config = self._config
        out = []
        for conn_id, attrs in connections:
            decision = self._decide_or_deny(config, attrs)
            if not decision.allow:
                out.append((conn_id, decision))
        if out:
            with self._lock:
                self._counts["revoked"] += len(out)
        return out

    def _decide_or_deny(self, config: CompiledConfig, attrs: ConnectionAttrs) -> Decision:
        try:
            return self._decide(config, attrs)
        except Exception as exc:  # fail closed, whatever went wrong
            log.exception("policy evaluation failed for %s", attrs.destination_workload)
            self._count("errors")
            return Decision(False, "", f"policy engine error (fail closed): {exc}")

    def _decide(self, config: CompiledConfig, attrs: ConnectionAttrs) -> Decision:
        uid = attrs.destination_workload
        sets = config.sets.get(uid)
        if sets is None:
            namespace, labels = _workload_facts(config, uid, attrs.destination_namespace)
            enforced = _select(config, namespace, labels, dry_run=False)
            shadow = _select(config, namespace, labels, dry_run=True)
            sets = (enforced, shadow if shadow != enforced else None)
            config.sets[uid] = sets
        peer = Peer(attrs, self.trust_domain)
        decision = self._evaluate(config, sets[0], peer, attrs)
        if sets[1] is None:
            return decision
        would = self._evaluate(config, sets[1], peer, attrs)
        if would.allow == decision.allow:
            return decision
        verb = "allow" if would.allow else "deny"
        return replace(
            decision,
            dry_run=True,
            reason=f"{decision.reason}; dry-run: {would.policy or 'default'} would {verb}",
        )

    def _evaluate(
        self, config: CompiledConfig, ps: PolicySet, peer: Peer, attrs: ConnectionAttrs
    ) -> Decision:
        for p in ps.deny:
            if p.match(peer):
                return p.decision
        decision: Decision | None = None
        for module in ps.rego:
            verdict = self._rego(config, module, attrs)
            if not verdict.allow:
                return verdict
            decision = decision or verdict  # a Rego allow is an ALLOW match
        if decision is None:
            for p in ps.allow:
                if p.match(peer):
                    decision = p.decision
                    break
            else:
                decision = ps.otherwise
        for p in ps.audit:
            if p.match(peer):
                return replace(decision, audited=True, audit_policy=p.name)
        return decision

    def _rego(self, config: CompiledConfig, module: RegoModule, attrs: ConnectionAttrs) -> Decision:
        key = (id(module), attrs)
        cached = config.rego_cache.get(key)
        if cached is not None:
            self._count("rego_cache_hits")
            return cached
        self._count("rego_cache_misses")
        namespace, labels = _workload_facts(config, attrs.destination_workload, attrs.destination_namespace)
        try:
            allowed, reason = module.evaluate(rego_input(attrs, labels, self.trust_domain))
        except RegoEvalError as exc:
            # Not cached: an erroring module is counted on every connection it denies.
            self._count("rego_errors")
            return Decision(
                False, module.name, f"denied by RegoPolicy: evaluation failed (fail closed): {exc}"
            )
        verb = "allowed" if allowed else "denied"
        decision = Decision(allowed, module.name, f"{verb} by RegoPolicy: {reason}")
        if len(config.rego_cache) >= REGO_CACHE_MAX:
            config.rego_cache.clear()
        config.rego_cache[key] = decision
        return decision

    # -- peer authentication ------------------------------------------------------------------------
    def mtls_mode(self, workload: Workload | str, port: int) -> str:
        """STRICT | PERMISSIVE | DISABLE for an inbound connection to `workload` (object or uid) on `port`."""
        config = self._config
        uid = workload if isinstance(workload, str) else workload.uid
        mode = config.mtls.get((uid, port))
        if mode is None:
            if isinstance(workload, str):
                namespace, labels = _workload_facts(config, uid, "")
            else:
                namespace, labels = workload.namespace, workload.labels
            mode = config.peerauth.mode(namespace, labels, port)
            config.mtls[(uid, port)] = mode
        return mode

    # -- introspection ------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One row per policy object, for `ambit debug policies`."""
        config = self._config
        root = config.mesh.root_namespace
        rows = []
        for p in sorted(config.sources, key=lambda p: (p.kind, p.meta.namespace, p.meta.name)):
            if isinstance(p, MeshConfig):
                rows.append(_row(config, p, "mesh", "", self._mesh_detail(p)))
            elif isinstance(p, AuthorizationPolicy):
                detail = f"{p.action} {len(p.rules)} rule(s)" + (" dry-run" if p.dry_run else "")
                if p.provider:
                    detail += f" provider {p.provider}"
                if p.target_refs:
                    scope, selector = "waypoint (not enforced)", ",".join(str(t) for t in p.target_refs)
                else:
                    scope, selector = _scope(p.meta.namespace, p.selector, root), _sel(p.selector)
                rows.append(_row(config, p, scope, selector, detail))
            elif isinstance(p, PeerAuthentication):
                ports = " ".join(f"{port}={m}" for port, m in sorted(p.port_modes.items()))
                detail = f"mtls {p.mode}" + (f" ports {ports}" if ports else "")
                rows.append(
                    _row(config, p, _scope(p.meta.namespace, p.selector, root), _sel(p.selector), detail)
                )
            elif isinstance(p, RegoPolicy):
                detail = f"rego query {p.query}"
                rows.append(
                    _row(config, p, _scope(p.meta.namespace, p.selector, root), _sel(p.selector), detail)
                )
        return rows

    def _mesh_detail(self, mesh: MeshConfig) -> str:
        return (
            f"defaultDeny={str(mesh.default_deny).lower()} rootNamespace={mesh.root_namespace} "
            f"defaultMtlsMode={mesh.default_mtls_mode} trustDomain={mesh.trust_domain or self.trust_domain}"
        )

    def counters(self) -> dict[str, int]:
        config = self._config
        with self._lock:
            out = dict(self._counts)
        out["version"] = config.version
        out["authorization_policies"] = len(config.authz)
        out["policy_warnings"] = len(config.warnings)  # policies the node enforces differently (or not)
        out["rego_policies"] = len(config.rego)
        out["rego_cache_entries"] = len(config.rego_cache)
        out["default_deny"] = int(config.mesh.default_deny)
        return out

    # -- internals ----------------------------------------------------------------------------------
    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _emit(self, config: CompiledConfig, attrs: ConnectionAttrs, decision: Decision) -> None:
        assert self._audit is not None
        record = {
            "decision": "allow" if decision.allow else "deny",
            "policy": decision.policy,
            "reason": decision.reason,
            "audited": decision.audited,
            "audit_policy": decision.audit_policy,
            "dry_run": decision.dry_run,
            "source_principal": str(attrs.source_principal) if attrs.source_principal else "",
            "source_ip": attrs.source_ip,
            "destination_ip": attrs.destination_ip,
            "destination_port": attrs.destination_port,
            "destination_workload": attrs.destination_workload,
            "tls": attrs.tls,
            "config_version": config.version,
        }
        try:
            self._audit(record)
        except Exception:
            self._count("audit_errors")
            log.exception("audit sink failed")


@dataclass(frozen=True)
class _EmptySnapshot:
    version: int = 0
    workloads: Mapping[str, Workload] = field(default_factory=dict)
    policies: tuple[Any, ...] = ()


def _scope(namespace: str, selector: Mapping[str, str] | None, root: str) -> str:
    if selector is not None:
        return "workload" if namespace != root else "workload (all namespaces)"
    return "mesh" if namespace == root else "namespace"


def _sel(selector: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) if selector else ""


def _row(config: CompiledConfig, p: Any, scope: str, selector: str, detail: str) -> dict[str, Any]:
    return {
        "kind": p.kind,
        "namespace": p.meta.namespace,
        "name": p.meta.name,
        "scope": scope,
        "selector": selector,
        "detail": detail,
        "warnings": list(config.warnings.get(p.uid, ())) if isinstance(p, AuthorizationPolicy) else [],
        "version": config.version,
    }


__all__ = ["PolicyEngine", "PolicyError", "compile_config"]
