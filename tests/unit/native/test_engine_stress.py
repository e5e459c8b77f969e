"""Concurrency stress: >= 1,000 concurrent HBONE streams, random sizes 0 B - 1 MiB each way, SHA-256 checked
both ways, on one engine (same node) and between two engines (two nodes), with 1 and 2 loops.

The orderings (engine_stress.ORDERS) include the ones that lost data before: a client that uploads and then
resets its socket (the bytes already read from it were dropped with the RST_STREAM, and a write failing
first kept the rest unread), and a peer reset that arrives while the destination is still being connected
(the buffered upload was dropped with the stream)."""

from __future__ import annotations

import pytest
from engine_stress import run_stress
from engine_testkit import Pki

from native.engine import Engine


@pytest.mark.parametrize("cross_node", [False, True], ids=["same-node", "cross-node"])
@pytest.mark.parametrize("threads", [1, 2], ids=["1-loop", "2-loops"])
def test_thousand_concurrent_streams_lose_nothing(pki: Pki, threads: int, cross_node: bool) -> None:
    counters: list[dict[str, int]] = []

    def check(client: Engine, server: Engine) -> None:
        counters.extend([client.counters(), server.counters()])

    result = run_stress(pki, 1000, threads, cross_node, conns=4, seed=threads * 2 + cross_node,
                        on_engines=check)  # fmt: skip
    assert result.streams == 1000
    assert result.mismatches == []
    assert all(c["errors_protocol"] == 0 and c["events_dropped"] == 0 for c in counters)
