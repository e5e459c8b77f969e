"""Reachability check for the lab: a TCP echo server in every pod, every pod connects to every pod."""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass

from agent import netns as nsx
from agent.lab.plan import LabPlan

ECHO_PORT = 7007


def serve_echo(port: int, ready: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """Echo every byte back until the peer closes; one thread per connection."""
    srv = socket.create_server(("0.0.0.0", port), reuse_port=False)
    srv.settimeout(0.2)
    if ready is not None:
        ready.set()
    while stop is None or not stop.is_set():
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_echo_conn, args=(conn,), daemon=True).start()
    srv.close()


def _echo_conn(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def echo_roundtrip(ip: str, port: int, payload: bytes, timeout: float = 3.0) -> bytes:
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


@dataclass(frozen=True)
class ProbeResult:
    src: str
    dst: str
    ok: bool
    detail: str


def _probe_targets(targets: list[tuple[str, str]], port: int) -> list[tuple[str, bool, str]]:
    out = []
    for name, ip in targets:
        payload = f"ambit-probe->{name}".encode()
        try:
            got = echo_roundtrip(ip, port, payload)
            out.append((name, got == payload, "ok" if got == payload else f"echo mismatch: {got[:40]!r}"))
        except OSError as exc:
            out.append((name, False, str(exc)))
    return out


def check_all_pairs(plan: LabPlan, port: int = ECHO_PORT) -> list[ProbeResult]:
    """Start an echo server in each pod, connect from every pod to every other pod, stop the servers."""
    pods = plan.pods()
    servers = [nsx.popen_in(p.netns, [sys.executable, "-c", _SERVER_SNIPPET, str(port)]) for p in pods]
    try:
        _wait_listening(plan, port)
        results = []
        for src in pods:
            targets = [(d.name, d.ip) for d in pods if d is not src]
            for dst, ok, detail in nsx.run_in(src.netns, _probe_targets, targets, port):
                results.append(ProbeResult(src.name, dst, ok, detail))
        return results
    finally:
        for proc in servers:
            proc.terminate()
        for proc in servers:
            proc.wait(timeout=5)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_listening(plan: LabPlan, port: int, attempts: int = 100) -> None:
    for pod in plan.pods():
        for _ in range(attempts):
            if nsx.run_in(pod.netns, _listening, port):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"echo server in {pod.name} did not start on :{port}")


# The server runs as its own interpreter so it needs nothing from this process's state.
_SERVER_SNIPPET = "import sys; from agent.lab.probe import serve_echo; serve_echo(int(sys.argv[1]))"
