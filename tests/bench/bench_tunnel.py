"""The HBONE tunnel against plain TCP and a stunnel mTLS tunnel, in one netns lab (2 nodes x 2 pods).

- plain: pod-1-2 -> pod-2-2 (and pod-2-3), none enrolled (no capture, no proxy).
- stunnel: pod-1-2 -> stunnel client in node-1 -> mTLS -> stunnel server in node-2 -> pod-2-2 (same
  topology as the mesh: one tunnel hop per node, certificates from the same CA).
- ambit: pod-1-1 -> capture -> proxy node-1 -> HBONE (mTLS, HTTP/2 CONNECT) -> proxy node-2 -> pod-2-1 (and
  pod-2-4).
Cases: throughput with 1 and 4 streams, request/response latency p50/p99 on one connection, new
connections per second (connect, 1-byte echo, close), to one destination pod and alternating between two
(HBONE pools per (source pod, destination pod): two pool keys where pooling per node had one). Each case runs
AMBIT_BENCH_SECONDS (default 2 s), for plain, stunnel and ambit in turn, AMBIT_BENCH_REPS times (default 3;
tests/bench/paired.py: medians, spread, per-repetition ratios).
This is the proxy alone (nftables tproxy capture, the proxy driver): the whole agent (eBPF capture, plane)
against stunnel is bench_datapath (throughput, RR) and bench_agent / bench_connrate (new connections).
The proxies run with the Proxy's defaults; AMBIT_BENCH_ENGINE_THREADS / AMBIT_BENCH_CONNECTIONS_PER_KEY
override them (to compare configurations).
Rows compare stunnel to plain, and ambit to stunnel.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import netns
from agent.lab import control
from agent.lab.plan import LabPlan
from api.spiffe import SpiffeId
from tests.bench import paired
from tests.integration.proxy import proxy_lab

SECONDS = float(os.environ.get("AMBIT_BENCH_SECONDS", "2"))
REPS = int(os.environ.get("AMBIT_BENCH_REPS", "3"))
STUNNEL_PORTS = {proxy_lab.COUNT_SINK: 19084, proxy_lab.ECHO: 19080}  # client-side listen port per service
STUNNEL_SERVER_PORT = 19443
CHUNK = 1 << 20


# --- clients (run in a pod netns) ---------------------------------------------------------------


def throughput(ip: str, port: int, streams: int, seconds: float) -> float:
    """Gbit/s summed over `streams` connections, each sending for `seconds` to the counting sink."""
    totals = [0] * streams
    block = memoryview(b"\x5a" * CHUNK)

    def one(i: int) -> None:
        with socket.create_connection((ip, port), timeout=30) as sock:
            deadline = time.monotonic() + seconds
            sent = 0
            while time.monotonic() < deadline:
                sock.sendall(block)
                sent += CHUNK
            sock.shutdown(socket.SHUT_WR)
            counted = int(sock.makefile("rb").readline())
            totals[i] = counted if counted == sent else 0

    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(totals) * 8 / (time.monotonic() - started) / 1e9


def request_response(ip: str, port: int, seconds: float) -> tuple[float, float]:
    """(p50, p99) in microseconds of 1-byte echoes on one connection."""
    samples = []
    with socket.create_connection((ip, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            sock.sendall(b"x")
            if not sock.recv(1):
                break
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def connection_rate(ip: str, port: int, seconds: float, *more_ips: str) -> float:
    """Connections per second: connect, one echoed byte, close, one after another (round robin over `ip` and
    `more_ips`: several destination pods, so several HBONE pool keys)."""
    done = 0
    ips = (ip, *more_ips)
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < deadline:
        with socket.create_connection((ips[done % len(ips)], port), timeout=30) as sock:
            sock.sendall(b"x")
            if sock.recv(1) == b"x":
                done += 1
    return done / (time.monotonic() - started)


# --- stunnel ------------------------------------------------------------------------------------


def _stunnel_conf(side: str, certs: Path, node_ip: str, peer_ip: str, pod_ip: str) -> str:
    common = [
        "foreground = yes",
        "pid =",
        "debug = 3",
        f"cert = {certs}/{side}.chain.pem",
        f"key = {certs}/{side}.key.pem",
        f"CAfile = {certs}/bundle.pem",
        "verifyChain = yes",
        "socket = l:TCP_NODELAY=1",
        "socket = r:TCP_NODELAY=1",
    ]
    services = []
    for target, local in STUNNEL_PORTS.items():
        if side == "client":
            services += [f"[s{target}]", "client = yes", f"accept = {node_ip}:{local}",
                         f"connect = {peer_ip}:{STUNNEL_SERVER_PORT + target - 8080}"]  # fmt: skip
        else:
            services += [f"[s{target}]", f"accept = {node_ip}:{STUNNEL_SERVER_PORT + target - 8080}",
                         f"connect = {pod_ip}:{target}", "requireCert = yes"]  # fmt: skip
    return "\n".join(common + services) + "\n"


def _start_stunnel(lab: proxy_lab.ProxyLab, workdir: Path) -> None:
    from mgmt.ca import CertificateAuthority

    ca = CertificateAuthority.generate_root(proxy_lab.TRUST_DOMAIN)
    (workdir / "bundle.pem").write_bytes(ca.bundle_pem())
    for side in ("client", "server"):
        chain, key = proxy_lab.issue(ca, SpiffeId.workload(proxy_lab.TRUST_DOMAIN, "bench", side))
        (workdir / f"{side}.chain.pem").write_text(chain)
        key_path = workdir / f"{side}.key.pem"
        key_path.write_text(key)
        key_path.chmod(0o600)
    n1, n2 = lab.plan.node("node-1"), lab.plan.node("node-2")
    pod_ip = lab.pod_ip("pod-2-2")
    for side, node, peer in (("server", n2, n1), ("client", n1, n2)):
        conf = workdir / f"stunnel-{side}.conf"
        conf.write_text(_stunnel_conf(side, workdir, node.ip, peer.ip, pod_ip))
        control.start_process(lab.prefix, f"stunnel-{side}", node.netns, ["stunnel4", str(conf)],
                              workdir / f"stunnel-{side}.log")  # fmt: skip
    _wait_listening(lab, "pod-1-2", n1.ip, STUNNEL_PORTS[proxy_lab.ECHO])


def _probe(ip: str, port: int) -> bool:
    try:
        return connection_rate(ip, port, 0.01) > 0
    except OSError:
        return False


def _wait_listening(lab: proxy_lab.ProxyLab, pod: str, ip: str, port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proxy_lab.in_pod(lab, pod, _probe, ip, port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{ip}:{port} not answering from {pod}")


def wide_port_range() -> None:
    """In a lab netns: the full ephemeral port range and TIME_WAIT reuse for new connections. Repeated
    connection-rate runs leave ~10,000 TIME_WAIT sockets per destination each (plain TCP runs at ~5,000
    connections/s); with the default ~28,000 ports, a third repetition searched a nearly full range (plain
    fell from ~5,000 to ~300 connections/s). Every path gets the same range."""
    Path("/proc/sys/net/ipv4/ip_local_port_range").write_text("1024 65535")
    Path("/proc/sys/net/ipv4/tcp_tw_reuse").write_text("1")


def widen_port_ranges(plan: LabPlan) -> None:
    """wide_port_range in every pod and node of the lab."""
    for name in [p.netns for p in plan.pods()] + [n.netns for n in plan.nodes]:
        netns.run_in(name, wide_port_range, timeout=10)


# --- the run ------------------------------------------------------------------------------------

# (client pod, destination ip, service port -> port to dial, more destination ips for the round robin case)
Target = tuple[str, str, dict[int, int], tuple[str, ...]]


def _targets(lab: proxy_lab.ProxyLab) -> dict[str, Target]:
    n1 = lab.plan.node("node-1")
    identity = {proxy_lab.ECHO: proxy_lab.ECHO, proxy_lab.COUNT_SINK: proxy_lab.COUNT_SINK}
    return {
        "plain": ("pod-1-2", lab.pod_ip("pod-2-2"), identity, (lab.pod_ip("pod-2-3"),)),
        "stunnel": ("pod-1-2", n1.ip, dict(STUNNEL_PORTS), (n1.ip,)),
        "ambit": ("pod-1-1", lab.pod_ip("pod-2-1"), identity, (lab.pod_ip("pod-2-4"),)),
    }


def _cases(lab: proxy_lab.ProxyLab, targets: dict[str, Target]) -> list[paired.Case]:
    """The measurements, each of one path by name (paired.interleave runs them path after path)."""

    def run(path: str, fn: Callable[..., Any], *args: Any) -> Any:
        return proxy_lab.in_pod(lab, targets[path][0], fn, *args, timeout=SECONDS * 10 + 30)

    def port(path: str, service: int) -> int:
        return targets[path][2][service]

    def streams(count: int, metric: str) -> paired.Case:
        return lambda p: {
            metric: run(p, throughput, targets[p][1], port(p, proxy_lab.COUNT_SINK), count, SECONDS)
        }

    def rr(p: str) -> dict[str, float]:
        p50, p99 = run(p, request_response, targets[p][1], port(p, proxy_lab.ECHO), SECONDS)
        return {"RR latency p50": p50, "RR latency p99": p99}

    def rate(metric: str, *, spread: bool) -> paired.Case:
        def case(p: str) -> dict[str, float]:
            _pod, ip, _ports, more = targets[p]
            return {
                metric: run(
                    p, connection_rate, ip, port(p, proxy_lab.ECHO), SECONDS, *(more if spread else ())
                )
            }

        return case

    return [
        streams(1, "throughput 1 stream"),
        streams(4, "throughput 4 streams"),
        rr,
        rate("new connections/s", spread=False),
        rate("new connections/s, 2 destination pods", spread=True),
    ]


UNITS = {
    "throughput 1 stream": "Gbit/s",
    "throughput 4 streams": "Gbit/s",
    "RR latency p50": "us",
    "RR latency p99": "us",
    "new connections/s": "conn/s",
    "new connections/s, 2 destination pods": "conn/s",
}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def run() -> list[dict[str, Any]]:
    prefix = "bt" + uuid.uuid4().hex[:4] + "-"
    with tempfile.TemporaryDirectory(prefix="ambit-bench-tunnel-") as tmp:
        workdir = Path(tmp)
        os.environ["AMBIT_LAB_STATE_DIR"] = str(workdir)
        try:
            lab = proxy_lab.start(
                prefix,
                workdir,
                pods=4,
                enrolled=["pod-1-1", "pod-2-1", "pod-2-4"],
                engine_threads=_env_int("AMBIT_BENCH_ENGINE_THREADS"),
                connections_per_key=_env_int("AMBIT_BENCH_CONNECTIONS_PER_KEY"),
            )
            _start_stunnel(lab, workdir)
            # no widen_port_ranges here: with it, a connect from pod-1-2 in this nftables lab timed out
            # (SYNs unanswered for 30 s) in the one run tried; the agent benches use it (lab_mesh)
            targets = _targets(lab)
            samples = paired.interleave(tuple(targets), _cases(lab, targets), REPS)
        finally:
            control.down(prefix)
    return paired.rows(samples, UNITS, {"ambit": "stunnel", "stunnel": "plain"}, ("ambit", "stunnel"))
