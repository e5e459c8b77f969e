"""PeerAuthentication: which mTLS mode a workload's port requires, with Istio's precedence
mesh (root namespace, no selector) < namespace (no selector) < workload (selector) < portLevelMtls.

UNSET inherits from the enclosing scope. Istio resolves ties between equal-scope policies by age; the
config store has no creation times, so the first by name wins (deterministic on every node).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from agent.policy.compiled import applies
from api.resources.policy import PeerAuthentication


class PeerAuthIndex:
    def __init__(
        self, policies: Iterable[PeerAuthentication], root_namespace: str, default_mode: str
    ) -> None:
        self.default_mode = default_mode
        self.root_namespace = root_namespace
        ordered = sorted(policies, key=lambda p: (p.meta.namespace, p.meta.name))
        self._mesh: PeerAuthentication | None = None
        self._namespace: dict[str, PeerAuthentication] = {}
        self._workload: dict[str, list[PeerAuthentication]] = {}
        for pa in ordered:
            ns = pa.meta.namespace
            if pa.selector is not None:
                self._workload.setdefault(ns, []).append(pa)
            elif ns == root_namespace:
                self._mesh = self._mesh or pa
            else:
                self._namespace.setdefault(ns, pa)

    def mode(self, namespace: str, labels: Mapping[str, str], port: int) -> str:
        mode = self.default_mode
        for pa in (self._mesh, self._namespace.get(namespace), self._workload_policy(namespace, labels)):
            if pa is None:
                continue
            if pa.mode != "UNSET":
                mode = pa.mode
            port_mode = pa.port_modes.get(port, "UNSET")
            if port_mode != "UNSET":
                mode = port_mode
        return mode

    def _workload_policy(self, namespace: str, labels: Mapping[str, str]) -> PeerAuthentication | None:
        for pa in self._workload.get(namespace, ()):
            if applies(pa.meta.namespace, pa.selector, self.root_namespace, namespace, labels):
                return pa
        return None

    def scope(self, pa: PeerAuthentication) -> str:
        if pa.selector is not None:
            return "workload"
        return "mesh" if pa.meta.namespace == self.root_namespace else "namespace"
