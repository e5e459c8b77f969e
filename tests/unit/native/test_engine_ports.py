"""A busy client address does not run the engine out of source ports (engine_ports.py, in a network
namespace of its own): with 2 ephemeral ports both held by streams to one upstream, a stream to another
upstream from the same address still connects (the engine's connects and the agent's own). Before, each
connect bound (address, 0) and the third failed with EADDRINUSE."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(__file__)
ROOT = os.path.join(HERE, "..", "..", "..")


def test_connects_from_one_address_share_ports_across_destinations() -> None:
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, os.path.join(HERE, "engine_ports.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answers == ["stream_accepted"] * 3 + ["agent connect started"]
