"""Measuring an agent process from outside: RSS, CPU, its pid in a lab; and pods' clients that load it
(many held connections, request/response). Shared by tests/integration/agent and tests/bench/bench_agent.
Run as `python -m tests.integration.agent.footprint hold IP PORT` inside a pod (see `holder`)."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent import netns as nsx
from agent.lab import state
from agent.lab.plan import LabPlan

MODULE = "tests.integration.agent.footprint"


# --- in a pod: a process holding many connections (commands on stdin) ---------------------------------


def hold(ip: str, port: int) -> None:
    """`open N` adds N echo-checked connections (prints the total), `close` closes them all."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (20000 if hard == resource.RLIM_INFINITY else min(20000, hard), hard)
    )
    held: list[socket.socket] = []
    for line in sys.stdin:
        verb, *args = line.split()
        if verb == "open":
            for _ in range(int(args[0])):
                sock = socket.create_connection((ip, port), timeout=30)
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    raise SystemExit("echo failed")
                held.append(sock)
        elif verb == "close":
            for sock in held:
                sock.close()
            held.clear()
        print(len(held), flush=True)


def ping_pong(ip: str, port: int, seconds: float) -> int:
    """1-byte request/response on one connection for `seconds`; how many completed."""
    done = 0
    with socket.create_connection((ip, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sock.sendall(b"x")
            if not sock.recv(1):
                break
            done += 1
    return done


# --- process accounting ----------------------------------------------------------------------------


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of /proc/PID/status in MiB: VmRSS, RssAnon (the heap, stacks), RssFile."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU of the process and its waited-for children (the BPF compiler)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def pid_of(prefix: str, name: str) -> int:
    lab = state.load(prefix)
    assert lab is not None
    return next(p.pid for p in lab.processes if p.name == name)


def cpu_during(pids: list[int], work: Callable[[], Any]) -> tuple[Any, list[float]]:
    before = [cpu_s(p) for p in pids]
    result = work()
    return result, [cpu_s(p) - b for p, b in zip(pids, before, strict=True)]


@contextlib.contextmanager
def holder(lab: LabPlan, pod: str, ip: str, port: int) -> Iterator[Callable[[str], int]]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    argv = [sys.executable, "-m", MODULE, "hold", ip, str(port)]
    proc = nsx.popen_in(lab.pod(pod).netns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    stdin, stdout = proc.stdin, proc.stdout
    assert stdin is not None and stdout is not None

    def command(line: str) -> int:
        stdin.write(line.encode() + b"\n")
        stdin.flush()
        answer = stdout.readline()
        if not answer:
            raise RuntimeError(f"connection holder failed at {line!r}")
        return int(answer)

    try:
        yield command
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    if sys.argv[1] == "hold":
        hold(sys.argv[2], int(sys.argv[3]))
