"""The edge gateway: WAF accuracy on the CRS corpus and request rate / p99 through the gateway with the WAF
off and at paranoia level 1, against nginx + ModSecurity (Debian's libnginx-mod-http-modsecurity) with the
very same rule text, in the same run.

- Corpus: ../shared/corpora/waf when present (else the vendored sample rows), replayed byte for byte over
  real sockets through a gateway with CRS 3.3.4 at PL1, inbound threshold 5; a per-category table goes to
  stderr.
- Rate: wrk (1 thread, AMBIT_BENCH_CONNECTIONS keep-alive connections, default 16, AMBIT_BENCH_SECONDS per
  run, default 2) sends one clean GET through each proxy to the same backend (an nginx answering 200); the
  three proxies run side by side and are measured in turns, AMBIT_BENCH_ROUNDS rounds (default 3), medians
  reported. The gateway runs one data plane thread and nginx one worker (AMBIT_BENCH_GATEWAY_WORKERS).
Rows compare WAF on to WAF off (target >= 0.7) and the gateway to nginx + ModSecurity (target > 1).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from api.resources import Meta
from api.resources.wafpolicy import TargetRef, WafPolicy
from gateway.dataplane import WAF_BLOCK
from gateway.waf import RuleSetCache, rules_text
from tests.gateway_corpus import SAMPLE, Backend, full_corpus_rows, load_rows, raw_request, replay
from tests.gateway_fixtures import (
    closed_port,
    free_port,
    gateway_doc,
    policy_doc,
    route_doc,
    running_gateway,
    service_doc,
    write_config,
)

SECONDS = float(os.environ.get("AMBIT_BENCH_SECONDS", "2"))
ROUNDS = int(os.environ.get("AMBIT_BENCH_ROUNDS", "3"))
CONNECTIONS = int(os.environ.get("AMBIT_BENCH_CONNECTIONS", "16"))
# data plane threads of the gateway and nginx workers: 1 each by default, so each proxy has one core
WORKERS = int(os.environ.get("AMBIT_BENCH_GATEWAY_WORKERS", "1"))
NGINX_MODSEC = "/usr/lib/nginx/modules/ngx_http_modsecurity_module.so"
PATH = "/products?id=42&sort=price"


def _wrk(port: int) -> tuple[float, float, int]:
    """(requests/s, p99 ms, requests) of one clean GET on keep-alive connections."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{SECONDS:g}s",
            "--latency",
            "-H",
            "User-Agent: ambit-bench",
            "-H",
            "Accept: */*",
            f"http://127.0.0.1:{port}{PATH}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=SECONDS + 60,
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    assert m, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, float(m.group(1)) * scale, total


def _cpu_seconds(proc: psutil.Process) -> float:
    """CPU time (user + system) of a process; for an nginx master, of its workers."""
    procs = proc.children() if proc.name().startswith("nginx") else [proc]
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


@contextmanager
def _nginx(body: str, workers: int = 1) -> Iterator[psutil.Process]:
    prefix = Path(tempfile.mkdtemp(prefix="ambit-bench-nginx-"))
    os.chmod(prefix, 0o755)
    for d in ("tmp", "logs"):
        (prefix / d).mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(f"""{body.split("@@http@@")[0]}
worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    {body.split("@@http@@")[1]}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"nginx did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
        yield psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(prefix, ignore_errors=True)


def _corpus_rows(tmp: Path, backend_port: int) -> list[dict[str, Any]]:
    rows = full_corpus_rows()
    source = "../shared/corpora/waf" if rows else f"vendored sample ({SAMPLE.name})"
    rows = rows or load_rows(SAMPLE)
    port = free_port()
    docs = [
        gateway_doc([{"name": "http", "port": port, "protocol": "HTTP"}]),
        service_doc("app", backend_port),
        route_doc("app", "app"),
        policy_doc("crs", "Gateway", "edge"),
    ]
    with running_gateway(write_config(tmp / "corpus", docs)):
        result = replay(port, rows)
    print(
        f"\nWAF corpus ({source}), CRS 3.3.4 PL1, threshold 5, through the gateway:\n{result.table()}",
        file=sys.stderr,
    )
    for miss in result.misses:
        print(f"  {miss}", file=sys.stderr)
    agree = _oracle_agreement(rows)
    return [
        {"name": "corpus rows whose fired CRS rules equal the oracle's", "value": 100 * agree, "unit": "%"},
        {"name": "corpus attacks blocked", "value": 100 * result.attack_rate(), "unit": "%"},
        {"name": "corpus benign blocked", "value": 100 * result.benign_block_rate(), "unit": "%"},
    ]


def _oracle_agreement(rows: list[dict[str, Any]]) -> float:
    """Share of rows where the rules that fired (in-process, same rule set) are exactly the oracle's."""
    rules = RuleSetCache().compile(
        WafPolicy(Meta("crs", "default"), (TargetRef("Gateway", "edge", "default"),))
    )
    same = 0
    for row in rows:
        head, _, body = raw_request(row).partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        method, uri, version = lines[0].split(" ", 2)
        headers = [(k, v) for k, _, v in (line.partition(": ") for line in lines[1:])]
        verdict = rules.check(WAF_BLOCK, method, uri, version.split("/")[1], headers, body)
        same += sorted({r.rule_id for r in verdict.rules} - {"949110"}) == sorted(row["oracle_rules"])
    return same / max(1, len(rows))


@contextmanager
def _gateway(tmp: Path, backend_port: int, waf: bool) -> Iterator[tuple[int, psutil.Process]]:
    """`ambit gateway` as its own process, as it runs in production (and as nginx runs here)."""
    port = closed_port()
    docs = [
        gateway_doc([{"name": "http", "port": port, "protocol": "HTTP"}]),
        service_doc("app", backend_port),
        route_doc("app", "app"),
    ]
    if waf:
        docs.append(policy_doc("crs", "Gateway", "edge"))
    directory = write_config(tmp / f"rate-{waf}", docs)
    argv = [
        sys.executable,
        "-m",
        "agent.cli",
        "gateway",
        "--config-dir",
        str(directory),
        "--threads",
        str(WORKERS),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None:
                raise RuntimeError("ambit gateway exited")
            time.sleep(0.1)
        yield port, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _wrk_warm(port: int) -> None:
    subprocess.run(
        ["wrk", "-t1", "-c4", "-d1s", f"http://127.0.0.1:{port}/"], capture_output=True, timeout=60
    )


@contextmanager
def _nginx_modsec(tmp: Path, backend_port: int) -> Iterator[tuple[int, psutil.Process]]:
    rules = tmp / "modsec-rules.conf"
    rules.write_text(
        rules_text(WafPolicy(Meta("crs", "default"), (TargetRef("Gateway", "edge", "default"),)))
    )
    port = closed_port()  # nginx binds it
    conf = f"""load_module {NGINX_MODSEC};
@@http@@
    upstream app {{ server 127.0.0.1:{backend_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        modsecurity on;
        modsecurity_rules_file {rules};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    with _nginx(conf, WORKERS) as proc:
        yield port, proc


@dataclass(frozen=True)
class Rate:
    rps: float
    p99_ms: float
    cpu_us: float  # CPU time the proxy spent per request


def _interleaved(targets: list[tuple[int, psutil.Process]]) -> list[Rate]:
    """Medians of ROUNDS runs per proxy, taken in turns: on a shared machine the load changes from second
    to second, and turns spread it over all proxies alike. CPU per request is the steadiest number: it does
    not depend on how much of a core the proxy got."""
    for port, _ in targets:
        _wrk_warm(port)
    runs: list[list[tuple[float, float, float]]] = [[] for _ in targets]
    for _ in range(ROUNDS):
        for i, (port, proc) in enumerate(targets):
            before = _cpu_seconds(proc)
            rps, p99, total = _wrk(port)
            runs[i].append((rps, p99, (_cpu_seconds(proc) - before) * 1e6 / max(1, total)))
    return [Rate(*(statistics.median(r[k] for r in rs) for k in range(3))) for rs in runs]


def run() -> list[dict[str, Any]]:
    if not shutil.which("wrk") or not Path(NGINX_MODSEC).exists():
        raise RuntimeError("bench_gateway needs wrk, nginx and libnginx-mod-http-modsecurity (make setup)")
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="ambit-bench-gw-"))
    backend_port = closed_port()  # nginx binds it
    backend_conf = f"""@@http@@
    server {{
        listen 127.0.0.1:{backend_port};
        keepalive_requests 100000;
        location / {{ return 200 "ok\\n"; }}
    }}"""
    corpus_backend = Backend()
    try:
        rows += _corpus_rows(tmp, corpus_backend.port)
        with (
            _nginx(backend_conf),
            _gateway(tmp, backend_port, waf=False) as (off_port, off_proc),
            _gateway(tmp, backend_port, waf=True) as (on_port, on_proc),
            _nginx_modsec(tmp, backend_port) as (nginx_port, nginx_proc),
        ):
            off, on, nginx = _interleaved(
                [(off_port, off_proc), (on_port, on_proc), (nginx_port, nginx_proc)]
            )
    finally:
        corpus_backend.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rows += [
        {"name": "gateway WAF off req/s", "value": off.rps, "unit": "req/s"},
        {
            "name": "gateway WAF PL1 req/s",
            "value": on.rps,
            "unit": "req/s",
            "baseline": "gateway WAF off req/s",
        },
        {"name": "nginx+ModSecurity PL1 req/s", "value": nginx.rps, "unit": "req/s"},
        {
            "name": "gateway WAF PL1 req/s vs nginx",
            "value": on.rps,
            "unit": "req/s",
            "baseline": "nginx+ModSecurity PL1 req/s",
        },
        {"name": "gateway WAF off p99", "value": off.p99_ms, "unit": "ms"},
        {"name": "gateway WAF PL1 p99", "value": on.p99_ms, "unit": "ms", "baseline": "gateway WAF off p99"},
        {"name": "nginx+ModSecurity PL1 p99", "value": nginx.p99_ms, "unit": "ms"},
        {
            "name": "gateway WAF PL1 p99 vs nginx",
            "value": on.p99_ms,
            "unit": "ms",
            "baseline": "nginx+ModSecurity PL1 p99",
        },
        {"name": "gateway WAF off CPU per request", "value": off.cpu_us, "unit": "us"},
        {
            "name": "gateway WAF PL1 CPU per request",
            "value": on.cpu_us,
            "unit": "us",
            "baseline": "gateway WAF off CPU per request",
        },
        {"name": "nginx+ModSecurity PL1 CPU per request", "value": nginx.cpu_us, "unit": "us"},
        {
            "name": "gateway WAF PL1 CPU per request vs nginx",
            "value": on.cpu_us,
            "unit": "us",
            "baseline": "nginx+ModSecurity PL1 CPU per request",
        },
    ]
    return rows
