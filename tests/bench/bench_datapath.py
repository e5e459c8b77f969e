"""Throughput (1 and 4 streams) and request/response latency (p50, p99) through two full node agents
(`ambit agent`, real plane, eBPF capture, the agents' default 2 engine loops), against a stunnel mTLS tunnel
and plain TCP in the same run: issue 15's shape (cross-node through two agents, 2 worker threads a side).

Lab: 2 nodes x 2 pods (bench_agent's): pod-1-1 -> pod-2-1 is captured (both agents on the path),
pod-1-2 -> pod-2-2 is opted out (plain) and is also stunnel's path (one tunnel process per node, certificates
from one CA, TCP_NODELAY both ways). The destination pods run tests/integration/proxy/pod_servers.py (a
counting sink, an echo).

Noise: every case is measured for ambit, stunnel and plain in turn, AMBIT_BENCH_REPS times (default 5), the
order flipping each repetition (tests/bench/paired.py); rows are medians, their spread, and the median of the
per-repetition ambit/stunnel ratios against issue 15's targets (throughput >= 1.5x stunnel: ratio >= 1
meets; RR p99 <= stunnel's: ratio <= 1 meets). Each throughput run sends for AMBIT_BENCH_STREAM_SECONDS
(default 3; ~1 GB at 3 Gbit/s) and counts only what the sink confirmed; each RR run lasts as long.
CPU per GB moved (4 streams) of the tunnel processes, both ends summed (/proc/PID/stat), says what the bytes
cost each tunnel.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from agent import netns as nsx
from agent.lab import control, mesh
from agent.lab.plan import LabPlan
from tests.bench import bench_agent, bench_tunnel, paired
from tests.integration.agent import footprint
from tests.integration.proxy import proxy_lab

SECONDS = float(os.environ.get("AMBIT_BENCH_STREAM_SECONDS", "3"))
REPS = int(os.environ.get("AMBIT_BENCH_REPS", "5"))
SERVERS = Path(proxy_lab.__file__).with_name("pod_servers.py")
PATHS = ("ambit", "stunnel", "plain")
UNITS = {
    "throughput 1 stream": "Gbit/s",
    "throughput 4 streams": "Gbit/s",
    "CPU per GB, 4 streams": "CPU-s/GB",
    "RR latency p50": "us",
    "RR latency p99": "us",
}
TARGETS = {"throughput 1 stream": 1.5, "throughput 4 streams": 1.5, "RR latency p99": 1.0}


def _start_servers(plan: LabPlan, pod: str) -> None:
    p = plan.pod(pod)
    log = mesh.run_dir(plan.prefix) / f"servers-{pod}.log"
    control.start_process(plan.prefix, f"servers-{pod}", p.netns, [sys.executable, str(SERVERS)], log)
    mesh.wait_listening(p.netns, p.ip, proxy_lab.COUNT_SINK, f"test servers in {pod}")


Target = tuple[str, str, dict[int, int], list[int]]  # client pod, destination, port to dial, tunnel pids


def start(plan: LabPlan, workdir: Path) -> dict[str, Target]:
    """The plane, both agents, the pods' test servers and stunnel up; the paths to measure."""
    agents, tunnels = bench_agent.start_paths(plan, workdir, _start_servers)
    identity = {proxy_lab.ECHO: proxy_lab.ECHO, proxy_lab.COUNT_SINK: proxy_lab.COUNT_SINK}
    return {  # path: (client pod, destination, service port -> port to dial, the tunnel processes)
        "plain": ("pod-1-2", plan.pod("pod-2-2").ip, identity, []),
        "stunnel": ("pod-1-2", plan.node("node-1").ip, dict(bench_tunnel.STUNNEL_PORTS), tunnels),
        "ambit": ("pod-1-1", plan.pod("pod-2-1").ip, identity, agents),
    }


def _measure(plan: LabPlan, workdir: Path) -> paired.Samples:
    targets = start(plan, workdir)

    def in_pod(path: str, fn: Any, *args: Any) -> Any:
        return nsx.run_in(plan.pod(targets[path][0]).netns, fn, *args, timeout=SECONDS * 10 + 30)

    def streams(count: int) -> paired.Case:
        def case(path: str) -> dict[str, float]:
            _pod, ip, ports, pids = targets[path]
            gbit_s, cpu = footprint.cpu_during(
                pids,
                lambda: in_pod(
                    path, bench_tunnel.throughput, ip, ports[proxy_lab.COUNT_SINK], count, SECONDS
                ),
            )
            out = {f"throughput {count} stream{'s' if count > 1 else ''}": gbit_s}
            if count > 1:
                out["CPU per GB, 4 streams"] = sum(cpu) / (gbit_s * SECONDS / 8) if pids and gbit_s else 0.0
            return out

        return case

    def rr(path: str) -> dict[str, float]:
        _pod, ip, ports, _pids = targets[path]
        p50, p99 = in_pod(path, bench_tunnel.request_response, ip, ports[proxy_lab.ECHO], SECONDS)
        return {"RR latency p50": p50, "RR latency p99": p99}

    for path, (_pod, ip, ports, _pids) in targets.items():  # warm: pooled connections, TLS sessions
        in_pod(path, bench_tunnel.throughput, ip, ports[proxy_lab.COUNT_SINK], 1, 0.3)
    return paired.interleave(PATHS, [streams(1), streams(4), rr], REPS)


def run() -> list[dict[str, Any]]:
    with bench_agent.lab_mesh("datapath") as (plan, workdir):
        samples = _measure(plan, workdir)
    rows = paired.rows(
        samples, UNITS, {"ambit": "stunnel", "stunnel": "plain"}, ("ambit", "stunnel"), TARGETS
    )
    return [r for r in rows if not r["name"].startswith("plain: CPU per GB")]
