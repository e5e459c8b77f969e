"""Resets never drop data, even when the network loses segments: client and server aborts through the
engine over a loopback that drops 1 in 10 data segments (engine_lossy.py, in a network namespace of its
own). Before: the engine reset a lingering socket once nothing was left unsent (SIOCOUTQNSD), which kills
a lost segment's retransmission: ~1 in 30 aborting streams lost bytes here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(__file__)
ROOT = os.path.join(HERE, "..", "..", "..")


def test_aborted_streams_lose_nothing_over_a_lossy_network() -> None:
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, os.path.join(HERE, "engine_lossy.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    dropped = result.pop("nft")
    assert dropped and "packets 0 " not in dropped[0], dropped  # the loss really happened
    assert result == {name: [] for name in result}
