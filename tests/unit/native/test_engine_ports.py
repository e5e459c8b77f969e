"""A busy client address does not run the engine out of source ports (engine_ports.py, in a network
namespace of its own): with 2 ephemeral ports both held by streams to one upstream, a stream to another
upstream from the same address still connects (the engine's connects and the agent's own). Before, each
connect bound (address, 0) and the third failed with EADDRINUSE."""

from __future__ import annotations

from engine_testkit import run_in_own_netns


def test_connects_from_one_address_share_ports_across_destinations() -> None:
    answers = run_in_own_netns("engine_ports.py", timeout=60)
    assert answers == ["stream_accepted"] * 3 + ["agent connect started"]
