"""Soak: 100,000 HBONE streams through two engines (two nodes, 2 loops each), 1,000 concurrent at a time,
random sizes 0 B - 64 KiB each way in the orderings of the stress test (tests/unit/native/engine_stress.py),
every byte SHA-256 checked both ways. Prints streams/s and the mismatches (must be 0: the run fails
otherwise). `AMBIT_BENCH_SOAK_STREAMS` changes the count."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from native.engine import Engine

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit", "native"))
from engine_stress import Driver  # noqa: E402
from engine_testkit import make_pki  # noqa: E402

BATCH = 1000
TOP = 64 * 1024


def run() -> list[dict[str, Any]]:
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
    for row in run():
        print(row)
