"""Ports for servers a test starts in another process (which bind by themselves, possibly more than once:
a plane restarted on the same address).

A port taken with bind(0) comes from the kernel's ephemeral range, the same range every outgoing connection
on the machine draws its source port from: between our close and the server's bind, any other job's
connect may take it ("Address already in use"). A port below the ephemeral range is only ever taken by an
explicit bind, so it stays free unless another test picks the very same number.
"""

from __future__ import annotations

import random
import socket


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def unused_port(host: str = "127.0.0.1") -> int:
    """A port below the ephemeral range that nothing is bound to now."""
    high = _ephemeral_low() - 1
    for _ in range(200):
        port = random.randint(max(1024, high - 12000), high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no unused port below the ephemeral range")
