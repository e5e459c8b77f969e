"""AuthorizationPolicy rules compiled into closures over sets, so a per-connection decision is a few
set lookups and string prefix tests: no YAML, no ipaddress objects, no per-call allocation beyond one Peer.

L7 attributes get ztunnel's fail-closed meaning at compile time, so deciding never looks at them: an ALLOW
rule that uses any never matches; in a DENY (or CUSTOM, AUDIT) rule each source, operation or condition is
reduced to its L4 fields, and one with no L4 field left matches every connection.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from agent.policy.decision import ConnectionAttrs, Decision
from api.resources.policy import AuthorizationPolicy, Condition, Operation, Rule, Source

# Istio writes principals without the scheme; policies written for the default trust domain keep
# working under another one (Istio's automatic trust-domain alias for cluster.local).
DEFAULT_TRUST_DOMAIN = "cluster.local"

IpKey = tuple[int, int]  # (address family bits: 32 | 128, address as int)


def ip_key(ip: str) -> IpKey | None:
    try:
        return 32, int.from_bytes(socket.inet_pton(socket.AF_INET, ip))
    except OSError:
        pass
    try:
        return 128, int.from_bytes(socket.inet_pton(socket.AF_INET6, ip))
    except OSError:
        return None


class Peer:
    """The attributes of one connection in the shape the matchers read; IPs are converted on first use."""

    __slots__ = ("principal", "path", "namespace", "port", "source_ip", "destination_ip", "_src", "_dst")

    def __init__(self, attrs: ConnectionAttrs, trust_domain: str) -> None:
        sp = attrs.source_principal
        if sp is None:
            self.principal: str | None = None
            self.path: str | None = None
            self.namespace: str | None = None
        else:
            self.principal = sp.trust_domain + sp.path
            # A namespace or service account is only ever read from an identity of this mesh's domain (the
            # proxy maps aliases onto it): `spiffe://evil.example/ns/demo/sa/x` is in no namespace.
            ours = sp.trust_domain == trust_domain
            self.path = (
                sp.path if ours else None
            )  # "/ns/<ns>/sa/<sa>" for a workload: what serviceAccounts match
            self.namespace = sp.namespace if ours else None
        self.port = attrs.destination_port
        self.source_ip = attrs.source_ip
        self.destination_ip = attrs.destination_ip
        self._src: IpKey | None | bool = False
        self._dst: IpKey | None | bool = False

    def src_key(self) -> IpKey | None:
        if self._src is False:
            self._src = ip_key(self.source_ip)
        return self._src  # type: ignore[return-value]

    def dst_key(self) -> IpKey | None:
        if self._dst is False:
            self._dst = ip_key(self.destination_ip)
        return self._dst  # type: ignore[return-value]


Check = Callable[[Peer], bool]


class StringMatch:
    """Istio string match: exact, `prefix*`, `*suffix`, `*` (any non-empty value)."""

    __slots__ = ("exact", "prefixes", "suffixes", "any")

    def __init__(self, patterns: Iterable[str]) -> None:
        exact, prefixes, suffixes = set(), [], []
        self.any = False
        for pat in patterns:
            if pat == "*":
                self.any = True
            elif pat.endswith("*"):
                prefixes.append(pat[:-1])
            elif pat.startswith("*"):
                suffixes.append(pat[1:])
            else:
                exact.add(pat)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)

    def __call__(self, value: str) -> bool:
        return (
            self.any
            or value in self.exact
            or (bool(self.prefixes) and value.startswith(self.prefixes))
            or (bool(self.suffixes) and value.endswith(self.suffixes))
        )


class IpSet:
    """CIDR membership as one set lookup per distinct prefix length."""

    __slots__ = ("_by_len",)

    def __init__(self, cidrs: Iterable[str]) -> None:
        by_len: dict[tuple[int, int], set[int]] = {}
        for cidr in cidrs:
            addr, _, plen_s = cidr.partition("/")
            key = ip_key(addr)
            if key is None:
                raise ValueError(f"not an IP block: {cidr!r}")
            bits, value = key
            plen = int(plen_s) if plen_s else bits
            by_len.setdefault((bits, plen), set()).add(value >> (bits - plen))
        self._by_len = tuple((bits, bits - plen, frozenset(v)) for (bits, plen), v in by_len.items())

    def __contains__(self, key: IpKey | None) -> bool:
        if key is None:
            return False
        family, value = key
        for bits, shift, nets in self._by_len:  # noqa: SIM110 - hot path: a loop is cheaper than any()
            if bits == family and (value >> shift) in nets:
                return True
        return False


def principal_patterns(patterns: Iterable[str], trust_domain: str) -> list[str]:
    out = []
    for pat in patterns:
        out.append(pat)
        if trust_domain != DEFAULT_TRUST_DOMAIN and pat.startswith(DEFAULT_TRUST_DOMAIN + "/"):
            out.append(trust_domain + pat[len(DEFAULT_TRUST_DOMAIN) :])
    return out


def _all(checks: list[Check]) -> Check:
    if len(checks) == 1:
        return checks[0]
    frozen = tuple(checks)

    def match(p: Peer) -> bool:
        for check in frozen:  # noqa: SIM110 - hot path: a loop is cheaper than a generator
            if not check(p):
                return False
        return True

    return match


def _any(checks: list[Check]) -> Check:
    if len(checks) == 1:
        return checks[0]
    frozen = tuple(checks)

    def match(p: Peer) -> bool:
        for check in frozen:  # noqa: SIM110 - hot path: a loop is cheaper than a generator
            if check(p):
                return True
        return False

    return match


def _on_principal(m: StringMatch, negate: bool) -> Check:
    # Plaintext peers have no principal: they never match principals, and always match notPrincipals
    # (Envoy's authenticated matcher is false without a peer certificate, so its negation is true).
    if negate:
        return lambda p: p.principal is None or not m(p.principal)
    return lambda p: p.principal is not None and m(p.principal)


def _on_namespace(m: StringMatch, negate: bool) -> Check:
    if negate:
        return lambda p: p.namespace is None or not m(p.namespace)
    return lambda p: p.namespace is not None and m(p.namespace)


def _on_service_account(paths: frozenset[str], negate: bool) -> Check:
    # As ztunnel: namespace and service account of the peer's SPIFFE ID, any trust domain; plaintext
    # peers never match serviceAccounts and always match notServiceAccounts (like principals).
    if negate:
        return lambda p: p.path is None or p.path not in paths
    return lambda p: p.path is not None and p.path in paths


def _service_account_paths(accounts: Iterable[str]) -> frozenset[str]:
    out = set()
    for account in accounts:
        ns, _, sa = account.partition("/")
        out.add(f"/ns/{ns}/sa/{sa}")
    return frozenset(out)


def _on_source_ip(ips: IpSet, negate: bool) -> Check:
    if negate:
        return lambda p: p.src_key() not in ips
    return lambda p: p.src_key() in ips


def _on_destination_ip(ips: IpSet, negate: bool) -> Check:
    if negate:
        return lambda p: p.dst_key() not in ips
    return lambda p: p.dst_key() in ips


def _on_port(ports: frozenset[int], negate: bool) -> Check:
    if negate:
        return lambda p: p.port not in ports
    return lambda p: p.port in ports


def _source(src: Source, trust_domain: str) -> Check:
    checks: list[Check] = []
    for values, negate in ((src.principals, False), (src.not_principals, True)):
        if values:
            checks.append(_on_principal(StringMatch(principal_patterns(values, trust_domain)), negate))
    for values, negate in ((src.namespaces, False), (src.not_namespaces, True)):
        if values:
            checks.append(_on_namespace(StringMatch(values), negate))
    for values, negate in ((src.service_accounts, False), (src.not_service_accounts, True)):
        if values:
            checks.append(_on_service_account(_service_account_paths(values), negate))
    for values, negate in ((src.ip_blocks, False), (src.not_ip_blocks, True)):
        if values:
            checks.append(_on_source_ip(IpSet(values), negate))
    return _all(checks) if checks else _always  # only L7 fields (or empty lists): no L4 constraint


def _operation(op: Operation) -> Check:
    checks = [_on_port(frozenset(v), negate) for v, negate in ((op.ports, False), (op.not_ports, True)) if v]
    return _all(checks) if checks else _always


def _condition(cond: Condition, trust_domain: str) -> Check:
    def one(values: tuple[str, ...], negate: bool) -> Check:
        if cond.key == "source.principal":
            return _on_principal(StringMatch(principal_patterns(values, trust_domain)), negate)
        if cond.key == "source.namespace":
            return _on_namespace(StringMatch(values), negate)
        if cond.key == "source.ip":
            return _on_source_ip(IpSet(values), negate)
        if cond.key == "destination.ip":
            return _on_destination_ip(IpSet(values), negate)
        return _on_port(frozenset(int(v) for v in values), negate)

    return _all([one(v, negate) for v, negate in ((cond.values, False), (cond.not_values, True)) if v])


def _always(p: Peer) -> bool:
    return True


def _never(p: Peer) -> bool:
    return False


def compile_rule(rule: Rule, trust_domain: str, action: str = "ALLOW") -> Check:
    """A rule matches when any of its sources, any of its operations and all of its conditions match.

    L7 attributes cannot be checked at L4 (ztunnel's semantics, fail closed): in an ALLOW rule they make the
    rule match nothing; elsewhere only the L4 part of each entry counts (an L7 condition matches anything).
    """
    if rule.l7_attributes and action == "ALLOW":
        return _never
    checks: list[Check] = []
    if rule.sources:
        checks.append(_any([_source(s, trust_domain) for s in rule.sources]))
    if rule.operations:
        checks.append(_any([_operation(o) for o in rule.operations]))
    checks.extend(_condition(c, trust_domain) for c in rule.conditions if not c.l7)
    return _all(checks) if checks else _always


@dataclass(frozen=True)
class CompiledPolicy:
    name: str  # "<namespace>/<name>"
    action: str
    dry_run: bool
    selector: Mapping[str, str] | None
    namespace: str
    match: Check  # empty rules: never matches (Istio: an ALLOW policy without rules allows nothing)
    decision: Decision  # what a match decides, built once: decisions allocate nothing per connection


def compile_policy(policy: AuthorizationPolicy, trust_domain: str) -> CompiledPolicy:
    rules = [compile_rule(r, trust_domain, policy.action) for r in policy.rules]
    l4_only = (
        " (its L7 attributes enforced on the L4 part only)"
        if any(r.l7_attributes for r in policy.rules)
        else ""
    )
    if policy.action == "ALLOW":
        decision = Decision(True, policy.uid, "allowed by ALLOW policy")
    elif policy.action == "DENY":
        decision = Decision(False, policy.uid, "denied by DENY policy" + l4_only)
    elif policy.action == "CUSTOM":
        decision = Decision(
            False,
            policy.uid,
            f"denied by CUSTOM policy: provider {policy.provider!r} unreachable from the node (fail closed)",
        )
    else:
        decision = Decision(True, "", "audited", audited=True, audit_policy=policy.uid)
    return CompiledPolicy(
        policy.uid,
        policy.action,
        policy.dry_run,
        policy.selector,
        policy.meta.namespace,
        _any(rules) if rules else _never,
        decision,
    )


def applies(
    namespace: str,
    selector: Mapping[str, str] | None,
    root_namespace: str,
    workload_namespace: str,
    labels: Mapping[str, str],
) -> bool:
    """Istio scoping: the policy's namespace (every namespace from the root one), narrowed by a selector."""
    if namespace != workload_namespace and namespace != root_namespace:
        return False
    return selector is None or all(labels.get(k) == v for k, v in selector.items())
