"""Soak: 100,000 HBONE streams through two engines (two nodes, 2 loops each), 1,000 concurrent at a time,
random sizes 0 B - 64 KiB each way in the orderings of the stress test (tests/unit/native/engine_stress.py),
every byte SHA-256 checked both ways. Prints streams/s and the mismatches (must be 0: the run fails
otherwise). `AMBIT_BENCH_SOAK_STREAMS` changes the count.

Each stream makes loopback TCP connections, so 100,000 of them leave more sockets in TIME_WAIT than the
default ephemeral port range holds ("Address already in use" after ~28,000 on a shared loopback). The soak
therefore runs in a network namespace of its own (root), with the full port range and TIME_WAIT reuse: the
host's loopback and its other users are untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from native.engine import Engine

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit", "native"))
from engine_stress import Driver  # noqa: E402
from engine_testkit import make_pki  # noqa: E402

BATCH = 1000
TOP = 64 * 1024


_NETNS_SETUP = (
    "ip link set lo up && sysctl -qw net.ipv4.ip_local_port_range='1024 65535' net.ipv4.tcp_tw_reuse=1 "
    'net.ipv4.tcp_max_tw_buckets=16384 && exec "$0" -m tests.bench.bench_soak --json'
)


def run() -> list[dict[str, Any]]:
    """The soak in a private network namespace (see the module doc); its rows come back as JSON."""
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    proc = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", _NETNS_SETUP, sys.executable],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"soak failed (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    rows: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return rows


def _soak() -> list[dict[str, Any]]:
    total = int(os.environ.get("AMBIT_BENCH_SOAK_STREAMS", "100000"))
    pki = make_pki()
    client, server = Engine(threads=2), Engine(threads=2)
    client.start()
    server.start()
    mismatches: list[str] = []
    done = 0
    started = time.monotonic()
    try:
        for batch in range(total // BATCH):
            driver = Driver(client, server, pki, BATCH, conns=4, seed=batch, top=TOP)
            result = driver.run()
            driver.close()
            mismatches += result.mismatches
            done += result.streams
        seconds = time.monotonic() - started
        counters = client.counters()
    finally:
        client.stop()
        server.stop()
    if mismatches:
        raise AssertionError(f"soak: {len(mismatches)} of {done} streams lost bytes: {mismatches[:5]}")

    def row(name: str, value: float, unit: str) -> dict[str, Any]:
        return {"name": name, "value": value, "unit": unit, "baseline": ""}

    return [
        row("soak streams (SHA-256 checked both ways)", done, "streams"),
        row("soak streams/s (1,000 concurrent)", done / seconds, "streams/s"),
        row("soak streams with lost bytes", len(mismatches), "streams"),
        row("soak streams reset (aborting orderings)", counters["streams_reset"], "streams"),
    ]


if __name__ == "__main__":
    if "--json" in sys.argv:  # the child in its own namespace
        print(json.dumps(_soak()))
    else:
        for row in run():
            print(row)
