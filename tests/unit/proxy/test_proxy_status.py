"""A refused CONNECT's status becomes the client-side response flag: policy denials (ztunnel's 401, our 403)
are DENY, everything else an upstream failure."""

from __future__ import annotations

import pytest

from agent.proxy.status import refused_stream_flags


@pytest.mark.parametrize(
    ("status", "flags"),
    [
        (401, "DENY"),  # ztunnel's answer when its authorization policy denies
        (403, "DENY"),  # ambit's
        (503, "UF"),  # the destination pod refused or is unreachable
        (400, "UF"),
        (404, "UF"),
        (500, "UF"),
        (200, "UF"),  # never reported as a refusal, but not a denial either
        (0, "UF"),  # reset before any response
        (None, "UF"),
    ],
)
def test_refused_stream_flags(status: int | None, flags: str) -> None:
    assert refused_stream_flags(status) == flags
