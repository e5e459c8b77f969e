"""Is one policy object acceptable? The one answer the admission webhook and the status writer give.

The data path's own code decides: `api.resources.parse` (fields, enums, L7 attributes ambit cannot enforce)
and the agent's policy compiler (`agent.policy.engine.compile_config`: Rego modules compile and probe-run,
MeshConfig trust domain), so an object admitted here is never NACKed by an agent for what it says alone.
On top, what neither checks because a typo there is legal but matches nothing: principals of the form
`<td>/ns/<ns>/sa/<sa>`, namespace names and label selectors of Kubernetes' syntax.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from api.resources import ResourceError, load_kinds, parse
from api.resources.policy import AuthorizationPolicy, Source
from mgmt.documents import normalized

POLICY_KINDS = frozenset({"AuthorizationPolicy", "PeerAuthentication", "RegoPolicy", "MeshConfig"})

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._~!$&'()+,;=:@%-]+$")  # a SPIFFE path segment, `*` excluded


class PolicyRejected(ValueError):
    """The object is not acceptable; the message says which field and why."""


def authored(obj: Mapping[str, Any], namespace: str = "") -> Any:
    """The object as its author wrote it (mgmt/documents: server-owned fields dropped); `namespace` fills
    metadata.namespace when the object does not carry it (an AdmissionReview names it in the request)."""
    doc = normalized(dict(obj))
    md = doc.get("metadata") if isinstance(doc, dict) else None
    if namespace and isinstance(md, dict) and not md.get("namespace"):
        md["namespace"] = namespace
    return doc


def _principal_problem(value: str) -> str | None:
    # api.resources already refused the spiffe:// scheme.
    if "*" in value:
        return None  # a prefix or suffix pattern (api.resources checked the wildcard's place)
    parts = value.split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(_SEGMENT.match(p) for p in parts):
        return "must be <trust-domain>/ns/<namespace>/sa/<service-account> (or a * pattern)"
    if not _DNS_LABEL.match(parts[2]):
        return f"namespace {parts[2]!r} is not a valid Kubernetes namespace name"
    return None


def _namespace_problem(value: str) -> str | None:
    if "*" in value or _DNS_LABEL.match(value):
        return None
    return "is not a valid Kubernetes namespace name (lower-case DNS label)"


def _label_key_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label key {key!r}: prefix must be a DNS subdomain"
    if not _LABEL_NAME.match(name):
        return f"label key {key!r}: name must be 1-63 alphanumerics, '-', '_' or '.'"
    return None


def _selector_problems(selector: Mapping[str, str] | None) -> Iterable[str]:
    for key, value in (selector or {}).items():
        problem = _label_key_problem(key)
        if problem:
            yield f"spec.selector.matchLabels: {problem}"
        if value and not _LABEL_NAME.match(value):
            yield f"spec.selector.matchLabels[{key}]: value {value!r} is not a valid label value"


def _source_problems(src: Source, where: str) -> Iterable[str]:
    for field_name, values, check in (
        ("principals", src.principals, _principal_problem),
        ("notPrincipals", src.not_principals, _principal_problem),
        ("namespaces", src.namespaces, _namespace_problem),
        ("notNamespaces", src.not_namespaces, _namespace_problem),
    ):
        for value in values:
            problem = check(value)
            if problem:
                yield f"{where}.{field_name}: {value!r} {problem}"


_CONDITION_CHECKS = {"source.principal": _principal_problem, "source.namespace": _namespace_problem}


def _authz_problems(policy: AuthorizationPolicy) -> Iterable[str]:
    for i, rule in enumerate(policy.rules):
        for j, src in enumerate(rule.sources):
            yield from _source_problems(src, f"spec.rules[{i}].from[{j}].source")
        for j, cond in enumerate(rule.conditions):
            check = _CONDITION_CHECKS.get(cond.key)
            if check is None:
                continue
            for value in (*cond.values, *cond.not_values):
                problem = check(value)
                if problem:
                    yield f"spec.rules[{i}].when[{j}] ({cond.key}): {value!r} {problem}"


@dataclass(frozen=True)
class _OnePolicy:
    """The agent compiler's snapshot protocol, holding the one object under review."""

    policy: Any
    version: int = 0

    @property
    def workloads(self) -> Mapping[str, Any]:
        return {}

    @property
    def policies(self) -> tuple[Any, ...]:
        return (self.policy,)


def check_policy(obj: Mapping[str, Any], trust_domain: str, namespace: str = "") -> Any:
    """The parsed policy object, or PolicyRejected naming the first problem."""
    from agent.policy.engine import compile_config
    from agent.policy.errors import PolicyError

    load_kinds()
    if obj.get("kind") not in POLICY_KINDS:
        raise PolicyRejected(f"kind {obj.get('kind')!r} is not a policy kind ambit checks")
    try:
        policy = parse(authored(obj, namespace))
    except ResourceError as exc:
        raise PolicyRejected(str(exc)) from None
    problems = list(_selector_problems(getattr(policy, "selector", None)))  # MeshConfig has none
    if isinstance(policy, AuthorizationPolicy):
        problems += _authz_problems(policy)
    if problems:
        raise PolicyRejected(f"{policy.kind} {policy.meta.name}: {'; '.join(problems)}")
    try:
        compile_config(_OnePolicy(policy), trust_domain)
    except PolicyError as exc:
        raise PolicyRejected(str(exc)) from None
    return policy
