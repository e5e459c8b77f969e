"""Python mirror of bpf/ambit_maps.h (the one place each map layout is restated) and typed map access.

The structs below must match the header byte for byte; `check_layout` compares them with the layout bcc
compiled from the C source (recorded in the compiled artifact, cache.py) and with the map the kernel
holds, so a drift fails the agent's start instead of corrupting maps.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.redirect.cache import MapSpec
    from agent.redirect.syscall import MapFd

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


Mirror = type[ctypes.Structure] | type[ctypes.c_uint32] | type[ctypes.c_uint64]


def check_layout(spec: MapSpec, key: Mirror, value: Mirror) -> None:
    """Fail when the C declaration of a map (as compiled) differs from this mirror. The kernel's map is
    compared with the compiled declaration when it is opened (loader.open_maps)."""
    for what, ours, c_size, c_fields in (
        ("key", key, spec.key_size, spec.key_fields),
        ("value", value, spec.value_size, spec.value_fields),
    ):
        if ctypes.sizeof(ours) != c_size:
            raise LayoutError(
                f"map {spec.name!r} {what}: bpf/ambit_maps.h has {c_size} bytes, "
                f"agent/redirect/maps.py {ctypes.sizeof(ours)}"
            )
        ours_fields = [f[0] for f in getattr(ours, "_fields_", [])]
        if ours_fields and ours_fields != list(c_fields):
            raise LayoutError(f"map {spec.name!r} {what}: fields {list(c_fields)} in C, {ours_fields} here")


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

    def __init__(self, spec: MapSpec, opened: MapFd) -> None:
        check_layout(spec, PodKey, Pod)
        self._map = opened

    def put(self, ip: str, workload: str, strict: bool) -> None:
        value = Pod(
            mode=MODE_STRICT if strict else MODE_PERMISSIVE,
            flags=0,
            workload=_truncate_utf8(workload, WORKLOAD_LEN - 1),
        )
        self._map.update(bytes(pod_key(ip)), bytes(value))

    def delete(self, ip: str) -> bool:
        return self._map.delete(bytes(pod_key(ip)))

    def entries(self) -> dict[str, PodEntry]:
        out = {}
        for key in list(self._map.iter_keys()):
            raw = self._map.lookup(key)
            if raw is None:  # removed while we listed
                continue
            value = Pod.from_buffer_copy(raw)
            out[socket.inet_ntoa(key)] = PodEntry(
                value.workload.decode(errors="replace"), value.mode == MODE_STRICT
            )
        return out


class FlowMap:
    """ambit_captured: connections handed to a listener (LRU), value the listener's port."""

    def __init__(self, spec: MapSpec, opened: MapFd) -> None:
        check_layout(spec, FlowKey, ctypes.c_uint32)
        self._map = opened

    def count(self) -> int:
        return sum(1 for _ in self._map.iter_keys())


class CounterMap:
    """ambit_counters: per-CPU packet counts per program path, summed over CPUs when read."""

    def __init__(self, spec: MapSpec, opened: MapFd) -> None:
        check_layout(spec, ctypes.c_uint32, ctypes.c_uint64)
        if opened.max_entries != len(COUNTERS):
            raise LayoutError(f"ambit_counters has {opened.max_entries} slots, maps.py names {len(COUNTERS)}")
        self._map = opened

    def values(self) -> dict[str, int]:
        out = {}
        for index, name in enumerate(COUNTERS):
            raw = self._map.lookup(struct.pack("=I", index)) or b""
            out[name] = sum(v for (v,) in struct.iter_unpack("=Q", raw))
        return out
