"""Which local pods the redirector should capture, derived from config: the only place that decides it."""

from __future__ import annotations

from collections.abc import Callable

from agent.redirect.maps import PodEntry
from api.resources.workload import Workload


def desired(
    local: list[Workload],
    enrolled: Callable[[Workload], bool],
    mtls_mode: Callable[[Workload], str],
) -> dict[str, PodEntry]:
    """Pod IP -> map entry for every enrolled local workload; STRICT ones fail closed without the agent."""
    out: dict[str, PodEntry] = {}
    for w in local:
        if not enrolled(w):
            continue
        entry = PodEntry(w.uid, mtls_mode(w) == "STRICT")
        for ip in w.ips:
            out[ip] = entry
    return out
