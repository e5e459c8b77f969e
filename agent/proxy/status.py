"""What a peer's answer to an HBONE CONNECT means for the client side's record (its response flag).

A policy denial is `DENY` whichever agent decided it: ztunnel answers 401 (Unauthorized) when its
authorization policy denies, an ambit destination answers 403. Every other refusal is an upstream failure
(`UF`): 503 (the pod refused or could not be reached), 400 (malformed CONNECT), 404 (not a workload on that
node), or no status at all (the stream was reset before a response).
"""

from __future__ import annotations

DENIAL_STATUSES = frozenset({401, 403})


def refused_stream_flags(status: int | None) -> str:
    """The response flag of a connection whose CONNECT the peer refused with `status` (None or 0: none)."""
    return "DENY" if status in DENIAL_STATUSES else "UF"
