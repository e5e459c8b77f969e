"""Which local pods the redirector should capture, derived from config: the only place that decides it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from api.resources.workload import Workload


@dataclass(frozen=True)
class Enrolment:
    workload_uid: str
    strict: bool  # STRICT workloads fail closed when the agent is away


@dataclass(frozen=True)
class EnrolmentChange:
    enroll: dict[str, Enrolment]  # pod IP -> what to (re)write in the map
    unenroll: frozenset[str]


def desired(
    local: list[Workload],
    enrolled: Callable[[Workload], bool],
    mtls_mode: Callable[[Workload], str],
) -> dict[str, Enrolment]:
    out: dict[str, Enrolment] = {}
    for w in local:
        if not enrolled(w):
            continue
        entry = Enrolment(w.uid, mtls_mode(w) == "STRICT")
        for ip in w.ips:
            out[ip] = entry
    return out


def diff(current: Mapping[str, Enrolment], wanted: Mapping[str, Enrolment]) -> EnrolmentChange:
    return EnrolmentChange(
        enroll={ip: e for ip, e in wanted.items() if current.get(ip) != e},
        unenroll=frozenset(set(current) - set(wanted)),
    )
