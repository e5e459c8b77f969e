"""Packet capture on a lab link (tcpdump writes pcap; we read it back) to show what crosses the wire."""

from __future__ import annotations

import select
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from agent import netns as nsx

_PCAP_GLOBAL = 24
_PCAP_RECORD = 16
_ETH = 14
_ETH_IPV4 = 0x0800
_TCP = 6


@dataclass
class CaptureReport:
    packets: int = 0
    tcp_packets: int = 0
    ports: Counter[int] = field(default_factory=Counter)  # server-side port of each TCP packet
    # (client IP, server IP, server port) of each TCP packet: who talks to whom on which port
    flows: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    needle_hits: int = 0  # packets whose payload contains the needle

    def only_ports(self, allowed: set[int]) -> bool:
        return set(self.ports) <= allowed


class Capture:
    """tcpdump on one interface of one namespace, from start() to stop()."""

    def __init__(self, netns_name: str, ifname: str) -> None:
        self.netns = netns_name
        self.ifname = ifname
        self._dir = tempfile.TemporaryDirectory(prefix="ambit-capture-")
        self.path = Path(self._dir.name) / "link.pcap"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # --immediate-mode: without it libpcap hands packets over in ~1 s blocks, and a short capture
        # stopped early reads none. -Z root: tcpdump would drop to its own user, who cannot write here.
        argv = [
            "tcpdump",
            "--immediate-mode",
            "-Z",
            "root",
            "-i",
            self.ifname,
            "-U",
            "-n",
            "-s",
            "0",
            "-w",
            str(self.path),
            "tcp",
        ]
        self._proc = nsx.popen_in(self.netns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # tcpdump says "listening on ..." once the capture is attached; packets before that are missed. Other
        # lines may come first (gRPC's fork handlers, when the parent used gRPC, write to the child's stderr).
        assert self._proc.stderr is not None
        seen: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
            line = self._proc.stderr.readline().decode(errors="replace") if ready else ""
            if "listening on" in line:
                return
            if not line:
                break
            seen.append(line.strip())
        self._proc.kill()
        raise RuntimeError(f"tcpdump on {self.netns}/{self.ifname} did not start: {' | '.join(seen[-3:])}")

    def stop(self, needle: bytes = b"", server_ports: set[int] | None = None) -> CaptureReport:
        if self._proc is not None:
            time.sleep(0.2)  # let -U flush the last packets
            self._proc.send_signal(signal.SIGINT)
            self._proc.wait(timeout=10)
            self._proc = None
        try:
            return read_pcap(self.path.read_bytes(), needle, server_ports or set())
        finally:
            self._dir.cleanup()


def read_pcap(data: bytes, needle: bytes, server_ports: set[int]) -> CaptureReport:
    report = CaptureReport()
    if len(data) < _PCAP_GLOBAL:
        return report
    endian = "<" if data[:4] == b"\xd4\xc3\xb2\xa1" else ">"
    off = _PCAP_GLOBAL
    while off + _PCAP_RECORD <= len(data):
        _, _, incl, _ = struct.unpack_from(endian + "IIII", data, off)
        frame = data[off + _PCAP_RECORD : off + _PCAP_RECORD + incl]
        off += _PCAP_RECORD + incl
        report.packets += 1
        _count_frame(frame, needle, server_ports, report)
    return report


def _count_frame(frame: bytes, needle: bytes, server_ports: set[int], report: CaptureReport) -> None:
    if len(frame) < _ETH + 20 or struct.unpack_from("!H", frame, 12)[0] != _ETH_IPV4:
        return
    ip = frame[_ETH:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != _TCP or len(ip) < ihl + 20:
        return
    sport, dport = struct.unpack_from("!HH", ip, ihl)
    report.tcp_packets += 1
    # Attribute the packet to the server side of its connection: the known port, else the lower one.
    port = dport if dport in server_ports else sport if sport in server_ports else min(sport, dport)
    report.ports[port] += 1
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    report.flows[(src, dst, port) if port == dport else (dst, src, port)] += 1
    data_off = ((ip[ihl + 12] >> 4) & 0x0F) * 4
    if needle and needle in ip[ihl + data_off :]:
        report.needle_hits += 1
