"""Python mirror of bpf/ambit_maps.h (the one place each map layout is restated) and typed map access.

The structs below must match the header byte for byte; `check_layout` compares them with the types bcc
generated from the C source at load time, so a drift fails the agent's start instead of corrupting maps.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from agent.redirect import pins

WORKLOAD_LEN = 120  # AMBIT_WORKLOAD_LEN
MODE_PERMISSIVE = 0  # AMBIT_MODE_PERMISSIVE
MODE_STRICT = 1  # AMBIT_MODE_STRICT

# enum ambit_counter, in order, without the AMBIT_CTR_ prefix.
COUNTERS = (
    "pod_packets",
    "uplink_packets",
    "agent_mark_pass",
    "socket_assigned",
    "not_enrolled_pass",
    "enrolled_flow_pass",
    "outbound_captured",
    "outbound_strict_drop",
    "outbound_permissive_pass",
    "outbound_orphan_drop",
    "inbound_captured",
    "inbound_strict_drop",
    "inbound_permissive_pass",
    "assign_error",
    "strict_unmediated_drop",
    "hbone_captured",
    "hbone_no_listener_drop",
)


class PodKey(ctypes.Structure):
    """struct ambit_pod_key."""

    _fields_ = [("ip", ctypes.c_uint32)]  # network byte order, as in the IP header


class Pod(ctypes.Structure):
    """struct ambit_pod."""

    _fields_ = [
        ("mode", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("workload", ctypes.c_char * WORKLOAD_LEN),
    ]


class FlowKey(ctypes.Structure):
    """struct ambit_flow_key (addresses and ports in network byte order)."""

    _fields_ = [
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
    ]


class LayoutError(RuntimeError):
    pass


@dataclass(frozen=True)
class PodEntry:
    workload: str
    strict: bool


def check_layout(
    name: str, table: Any, key: type[ctypes.Structure] | type[ctypes.c_uint32], leaf: type[Any]
) -> None:
    """Fail when bcc's view of a map (from the C header) differs from this module's mirror."""
    # Per-CPU maps: bcc's Leaf is the array of all CPUs' values, sLeaf the one-CPU value the C declares.
    for what, ours, theirs in (("key", key, table.Key), ("value", leaf, getattr(table, "sLeaf", table.Leaf))):
        if ctypes.sizeof(ours) != ctypes.sizeof(theirs):
            raise LayoutError(
                f"map {name!r} {what}: bpf/ambit_maps.h has {ctypes.sizeof(theirs)} bytes, "
                f"agent/redirect/maps.py {ctypes.sizeof(ours)}"
            )
        ours_fields = [f[0] for f in getattr(ours, "_fields_", [])]
        theirs_fields = [f[0] for f in getattr(theirs, "_fields_", [])]
        if ours_fields and ours_fields != theirs_fields:
            raise LayoutError(f"map {name!r} {what}: fields {theirs_fields} in C, {ours_fields} here")
        # bcc reuses a pinned map without comparing it with the declaration: a map pinned by an agent
        # with another layout would be silently misread, so compare with what the kernel holds.
        kernel = int(pins.fdinfo(table.map_fd).get(f"{what}_size", "-1"))
        if kernel != ctypes.sizeof(ours):
            raise LayoutError(
                f"pinned map {name!r} has {what}s of {kernel} bytes, this agent's layout "
                f"{ctypes.sizeof(ours)}: an incompatible agent pinned it; stop that datapath without "
                "--keep-datapath first"
            )


def pod_key(ip: str) -> PodKey:
    """The map key of an IPv4 address; raises ValueError for anything else."""
    addr = ipaddress.ip_address(ip)
    if not isinstance(addr, ipaddress.IPv4Address):
        raise ValueError(f"{ip!r} is not an IPv4 address (the datapath is IPv4 only)")
    return PodKey.from_buffer_copy(addr.packed)


def _truncate_utf8(text: str, limit: int) -> bytes:
    return text.encode()[:limit].decode(errors="ignore").encode()


class PodMap:
    """ambit_pods: enrolled pod IPs with their workload and mode."""

    def __init__(self, table: Any) -> None:
        check_layout("ambit_pods", table, PodKey, Pod)
        self._table = table

    def put(self, ip: str, workload: str, strict: bool) -> None:
        value = Pod(
            mode=MODE_STRICT if strict else MODE_PERMISSIVE,
            flags=0,
            workload=_truncate_utf8(workload, WORKLOAD_LEN - 1),
        )
        self._table[pod_key(ip)] = value

    def delete(self, ip: str) -> bool:
        try:
            del self._table[pod_key(ip)]
        except KeyError:
            return False
        return True

    def entries(self) -> dict[str, PodEntry]:
        out = {}
        for key, value in self._table.items():
            ip = socket.inet_ntoa(bytes(key))
            out[ip] = PodEntry(value.workload.decode(errors="replace"), value.mode == MODE_STRICT)
        return out


class FlowMap:
    """ambit_captured: connections handed to a listener (LRU), value the listener's port."""

    def __init__(self, table: Any) -> None:
        check_layout("ambit_captured", table, FlowKey, ctypes.c_uint32)
        self._table = table

    def count(self) -> int:
        return sum(1 for _ in self._table)


class CounterMap:
    """ambit_counters: per-CPU packet counts per program path, summed over CPUs when read."""

    def __init__(self, table: Any) -> None:
        check_layout("ambit_counters", table, ctypes.c_uint32, ctypes.c_uint64)
        if table.max_entries != len(COUNTERS):
            raise LayoutError(f"ambit_counters has {table.max_entries} slots, maps.py names {len(COUNTERS)}")
        self._table = table

    def values(self) -> dict[str, int]:
        return {name: int(sum(self._table[self._table.Key(i)])) for i, name in enumerate(COUNTERS)}
