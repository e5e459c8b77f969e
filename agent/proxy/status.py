"""Response flags (Envoy's vocabulary, as Istio's metrics and access logs carry them) from how the engine
says a connection ended.

A refused CONNECT: a policy denial is `DENY` whichever agent decided it (ztunnel answers 401 when its
authorization policy denies, an ambit destination 403); every other refusal is an upstream failure (`UF`):
503 (the pod refused or could not be reached), 400 (malformed CONNECT), 404 (not a workload on that node),
or no status at all (the stream was reset before a response).

A connection that was up, by what ended it, seen from the agent recording it: downstream is the source's
side (the client pod's socket at the source node, the HBONE stream at the destination node), upstream the
destination's (the HBONE stream at the source node, the pod's socket at the destination node). So a client's
reset is `DR` on both nodes' records and a server's reset `UR` on both:

| ended by | flag |
|---|---|
| EOF both ways (END_STREAM) | `-` |
| the destination reset (its pod's RST, or RST_STREAM from the destination node) | `UR` |
| the source reset (the client's RST, or RST_STREAM from the source node) | `DR` |
| the HBONE connection to the destination ended before the stream (source node) | `UC` |
| the HBONE connection from the source ended before the stream (destination node) | `DC` |
| this agent (a policy close is marked `DENY` first and keeps it), or an engine-side failure | `LR` |
"""

from __future__ import annotations

from agent.proxy.table import Path
from native.engine import Ending

DENIAL_STATUSES = frozenset({401, 403})

# The stream's own socket is the downstream one when we are the HBONE client, the upstream one when we serve.
_CLIENT = {
    Ending.NORMAL: "-",
    Ending.PEER_RESET: "UR",
    Ending.SOCKET_FAILED: "DR",
    Ending.CONNECTION_CLOSED: "UC",
}
_SERVER = {
    Ending.NORMAL: "-",
    Ending.PEER_RESET: "DR",
    Ending.SOCKET_FAILED: "UR",
    Ending.CONNECTION_CLOSED: "DC",
}
_SPLICE = {Ending.NORMAL: "-", Ending.SPLICE_A_FAILED: "DR", Ending.SPLICE_B_FAILED: "UR"}  # fd_a: the client
_BY_PATH = {Path.HBONE_CLIENT: _CLIENT, Path.HBONE_SERVER: _SERVER, Path.SPLICE: _SPLICE}


def refused_stream_flags(status: int | None) -> str:
    """The response flag of a connection whose CONNECT the peer refused with `status` (None or 0: none)."""
    return "DENY" if status in DENIAL_STATUSES else "UF"


def closed_flags(path: Path, end: Ending) -> str:
    """The response flag of a connection on `path` that was up and ended as the engine reports (`end`)."""
    return _BY_PATH[path].get(end, "LR")
