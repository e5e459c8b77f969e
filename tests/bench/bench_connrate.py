"""New connections per second through two full node agents, the shape of the independent harness issue 15
measures ztunnel with: 8 concurrent connectors, a new connection per request (connect through the mesh
cross-node, a small request, its echo, close), next to plain TCP and a stunnel mTLS tunnel in the same run.

Rows: connections/s of each path, and CPU per new connection of the tunnel processes (both ends summed:
the two agents, or the two stunnels) from /proc/PID/stat. Ratios to plain and to stunnel are what to read:
on this shared 2-vCPU machine the connectors and echo servers compete with the agents for the same cores.

Lab: 2 nodes x 2 pods (bench_agent's): pod-1-1 -> pod-2-1 is captured (eBPF, both agents on the path),
pod-1-2 -> pod-2-2 is opted out (plain) and is also stunnel's path (one tunnel process per node). The echo
servers and connectors are non-blocking single-threaded loops (`serve`, `connect_rate`), so a Python thread
per connection does not bound the rate.
AMBIT_BENCH_CONNECTORS (default 8), AMBIT_BENCH_SECONDS (default 2), AMBIT_BENCH_REPS (default 3: each path
measured in turn, interleaved, rows are medians with their spread: tests/bench/paired.py),
AMBIT_BENCH_PROFILE=DIR: py-spy records each agent during the first ambit case (flame graphs in DIR; needs
py-spy in the venv).
"""

from __future__ import annotations

import errno
import functools
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent import netns as nsx
from agent.lab import control, mesh
from agent.lab.plan import LabPlan
from tests.bench import bench_agent, bench_tunnel, paired
from tests.integration.agent import footprint
from tests.integration.proxy import proxy_lab

SECONDS = float(os.environ.get("AMBIT_BENCH_SECONDS", "2"))
CONNECTORS = int(os.environ.get("AMBIT_BENCH_CONNECTORS", "8"))
REPS = int(os.environ.get("AMBIT_BENCH_REPS", "3"))
ECHO = proxy_lab.ECHO  # stunnel's server side forwards to this port
METRICS_PORT = 15020
REQUEST = b"GET / HTTP/1.0\r\n\r\n"  # small request; the echo is the response


# --- in a pod: echo server and connectors (non-blocking, one thread) -----------------------------------


def serve(port: int) -> None:
    """Echo server: reads what a connection sends, writes it back, closes on EOF."""
    sel = selectors.DefaultSelector()
    srv = socket.create_server(("0.0.0.0", port), backlog=1024)
    srv.setblocking(False)
    sel.register(srv, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                for _ in range(64):
                    try:
                        conn, _addr = srv.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, conn)
                continue
            conn = key.data
            try:
                data = conn.recv(65536)
                if data:
                    conn.send(data)  # small: fits the socket buffer
                    continue
            except OSError:
                pass
            sel.unregister(conn)
            conn.close()


def connect_rate(ip: str, port: int, seconds: float, connectors: int) -> tuple[int, int]:
    """(completed, failed) connections in `seconds`, `connectors` in flight at a time, each: connect, send
    REQUEST, read its echo, close."""
    sel = selectors.DefaultSelector()
    done = failed = 0
    deadline = time.monotonic() + seconds

    def start() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((ip, port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(err, os.strerror(err))
        sel.register(sock, selectors.EVENT_WRITE, [sock, b""])

    for _ in range(connectors):
        start()
    while sel.get_map():
        ready = sel.select(5.0)
        if not ready:
            raise RuntimeError(f"no progress for 5 s ({len(sel.get_map())} connections in flight)")
        for key, _mask in ready:
            state = key.data
            sock = state[0]
            ok = None
            try:
                if key.events == selectors.EVENT_WRITE:
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        ok = False
                    else:
                        sock.send(REQUEST)
                        sel.modify(sock, selectors.EVENT_READ, state)
                else:
                    chunk = sock.recv(4096)
                    state[1] += chunk
                    if not chunk or len(state[1]) >= len(REQUEST):
                        ok = state[1] == REQUEST
            except OSError:
                ok = False
            if ok is None:
                continue
            sel.unregister(sock)
            sock.close()
            done, failed = (done + 1, failed) if ok else (done, failed + 1)
            if time.monotonic() < deadline:
                start()
    return done, failed


# --- the run ---------------------------------------------------------------------------------------------


def _start_echo(plan: LabPlan, pod: str) -> None:
    p = plan.pod(pod)
    argv = [sys.executable, "-c", f"from tests.bench.bench_connrate import serve; serve({ECHO})"]
    log = mesh.run_dir(plan.prefix) / f"echo-{pod}.log"
    control.start_process(plan.prefix, f"echo-{pod}", p.netns, argv, log)
    mesh.wait_listening(p.netns, p.ip, ECHO, f"echo server in {pod}")


def _profile(pids: list[int], out: Path | None, seconds: float) -> list[subprocess.Popen[bytes]]:
    if out is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).parent / "py-spy"
    procs = []
    if os.environ.get("AMBIT_BENCH_PERF"):  # the engine's C threads too (py-spy sees Python frames only)
        for i, pid in enumerate(pids):
            data = f"{out}/perf-{i + 1}.data"
            argv = ["perf", "record", "-F", "499", "-g", "-p", str(pid), "-o", data]
            argv += ["--", "sleep", f"{seconds}"]
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return procs
    for i, pid in enumerate(pids):
        argv = [str(spy), "record", "--native", "-r", "200", "-d", str(int(seconds) + 1), "-f", "raw",
                "-o", str(out / f"agent-{i + 1}.txt"), "-p", str(pid)]  # fmt: skip
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (comm) of a process, user and system apart: where a tunnel's
    per-connection time goes."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        for kind, value in (("user", fields[11]), ("sys", fields[12])):
            out[f"{comm} {kind}"] = out.get(f"{comm} {kind}", 0.0) + int(value) / tick
    return out


def _threads_report(name: str, pids: list[int], before: list[dict[str, float]], done: int) -> None:
    for pid, was in zip(pids, before, strict=True):
        now = thread_cpu(pid)
        spent = {k: (v - was.get(k, 0.0)) / done * 1e6 for k, v in now.items()}
        busy = ", ".join(f"{k} {v:.0f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v >= 5)
        print(f"connrate {name} pid {pid}: us per connection by thread: {busy}", file=sys.stderr)


def _fast_report(plan: LabPlan) -> None:
    """The agents' fast path counters (hits, misses by reason), from their metrics endpoint."""
    for node in plan.nodes:
        text = nsx.run_in(node.netns, mesh._http_get, f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10)
        lines = [ln for ln in text.splitlines() if "fastpath" in ln and not ln.startswith("#")]
        print(f"connrate {node.name}: {'; '.join(lines)}", file=sys.stderr)


def _measure(plan: LabPlan, workdir: Path) -> dict[str, float]:
    agents, tunnels = bench_agent.start_paths(plan, workdir, _start_echo)
    paths = {  # name: (client pod, destination, port, the tunnel processes)
        "plain": ("pod-1-2", plan.pod("pod-2-2").ip, ECHO, []),
        "stunnel": ("pod-1-2", plan.node("node-1").ip, bench_tunnel.STUNNEL_PORTS[ECHO], tunnels),
        "ambit": ("pod-1-1", plan.pod("pod-2-1").ip, ECHO, agents),
    }
    profile_dir = os.environ.get("AMBIT_BENCH_PROFILE")
    for pod, dst, port, _pids in paths.values():  # warm: pools, sessions
        nsx.run_in(plan.pod(pod).netns, connect_rate, dst, port, 0.3, CONNECTORS, timeout=30)
    profiled: set[str] = set()

    def one(name: str) -> dict[str, float]:
        pod, dst, port, pids = paths[name]
        netns = plan.pod(pod).netns
        profile = Path(profile_dir) if profile_dir and name == "ambit" and name not in profiled else None
        profiled.add(name)
        spies = _profile(pids, profile, SECONDS)
        threads_before = [thread_cpu(p) for p in pids]
        started = time.monotonic()
        work = functools.partial(
            nsx.run_in, netns, connect_rate, dst, port, SECONDS, CONNECTORS, timeout=SECONDS * 10 + 30
        )
        (done, failed), cpu = footprint.cpu_during(pids, work)
        elapsed = time.monotonic() - started
        for spy in spies:
            spy.wait(timeout=60)
        _threads_report(name, pids, threads_before, done)
        if failed:
            raise RuntimeError(f"{name}: {failed} of {done + failed} connections failed")
        out = {"new connections/s": done / elapsed}
        if pids:
            out["CPU per new connection"] = sum(cpu) / done * 1e6
            for i, c in enumerate(cpu):
                out[f"CPU per new connection, {'source' if i == 0 else 'destination'} side"] = c / done * 1e6
        return out

    # single runs swing 2-8x in their ratios with the machine's load: interleaved repetitions, medians
    samples = paired.interleave(tuple(paths), [one], REPS)
    time.sleep(2.5)  # the agents publish engine counters every 2 s
    _fast_report(plan)
    return paired.medians(samples)


# Issue 15's targets: ztunnel (release build) in the independent harness on this machine, 8 connectors, both
# tunnel processes: ambit should reach at least its connections/s (ratio >= 1) at no more CPU (ratio <= 1).
ZTUNNEL = {"new connections/s": 2930.0, "CPU per new connection": 445.0}

ROWS = (  # name, unit, baseline
    ("plain: new connections/s", "conn/s", ""),
    ("stunnel: new connections/s", "conn/s", "plain: new connections/s"),
    ("ambit: new connections/s", "conn/s", "stunnel: new connections/s"),
    ("stunnel: new connections/s, spread", "%", ""),
    ("ambit: new connections/s, spread", "%", ""),
    ("ambit vs plain: new connections/s", "conn/s", "plain: new connections/s"),
    ("stunnel: CPU per new connection", "us", ""),
    ("ambit: CPU per new connection", "us", "stunnel: CPU per new connection"),
    ("ambit: CPU per new connection, spread", "%", ""),
    ("target: ztunnel new connections/s", "conn/s", ""),
    ("ambit: new connections/s, vs ztunnel", "conn/s", "target: ztunnel new connections/s"),
    ("target: ztunnel CPU per new connection", "us", ""),
    ("ambit: CPU per new connection, vs ztunnel", "us", "target: ztunnel CPU per new connection"),
    ("stunnel: CPU per new connection, source side", "us", ""),
    ("stunnel: CPU per new connection, destination side", "us", ""),
    ("ambit: CPU per new connection, source side", "us", "stunnel: CPU per new connection, source side"),
    (
        "ambit: CPU per new connection, destination side",
        "us",
        "stunnel: CPU per new connection, destination side",
    ),
)


def run() -> list[dict[str, Any]]:
    with bench_agent.lab_mesh("connrate") as (plan, workdir):
        values = _measure(plan, workdir)
    values["ambit vs plain: new connections/s"] = values["ambit: new connections/s"]
    for name, target in ZTUNNEL.items():
        values[f"target: ztunnel {name}"] = target
        values[f"ambit: {name}, vs ztunnel"] = values[f"ambit: {name}"]
    return [{"name": n, "value": values[n], "unit": u, "baseline": b} for n, u, b in ROWS]
