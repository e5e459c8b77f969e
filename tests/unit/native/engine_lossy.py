"""The aborting orderings of the stress test over a lossy loopback, in a network namespace of its own.

Run as `python tests/unit/native/engine_lossy.py` inside `unshare --net` (test_engine_lossy.py does): it
brings lo up, makes nftables drop one in DROP_ONE_IN of the TCP segments with payload that lo delivers
(input hook: the sender believes them sent, and only a retransmission brings them), then drives
client_abort / server_abort streams through the engine and prints the mismatches as JSON.

Why: a reset must not destroy bytes the receiver has not got yet. "Transmitted" (SIOCOUTQNSD 0: nothing
left unsent) is not "delivered": a segment that was sent but lost needs a retransmission, and a RST sent
before it was acknowledged kills it (the receiver reads up to the hole, then sees the reset). On a loaded
machine loopback drops are rare but real; here they are made certain."""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from engine_stress import run_stress  # noqa: E402
from engine_testkit import make_pki  # noqa: E402

DROP_ONE_IN = 20
STREAMS = 300
ABORTS = ("client_abort", "server_abort")
_NFT = f"""
table inet lossy {{
    chain input {{
        type filter hook input priority 0;
        iif "lo" meta l4proto tcp meta length > 200 numgen random mod {DROP_ONE_IN} 0 counter drop
    }}
}}
"""


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["nft", "-f", "-"], input=_NFT, text=True, check=True)
    pki = make_pki()
    out: dict[str, list[str]] = {}
    for threads, cross_node in ((1, True), (2, False)):
        result = run_stress(pki, STREAMS, threads, cross_node, seed=threads, orders=ABORTS)
        out[f"{threads} loops, {'cross' if cross_node else 'same'} node"] = result.mismatches
    dropped = subprocess.run(["nft", "list", "table", "inet", "lossy"], capture_output=True, text=True).stdout
    out["nft"] = [line.strip() for line in dropped.splitlines() if "counter" in line]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
