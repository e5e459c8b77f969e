"""A refused CONNECT's status becomes the client-side response flag: policy denials (ztunnel's 401, our 403)
are DENY, everything else an upstream failure."""

from __future__ import annotations

import pytest

from agent.proxy.status import closed_flags, refused_stream_flags
from agent.proxy.table import Path
from native.engine import Ending, Event, ending


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


def _ev(kind: str, detail: str) -> Event:
    return Event(kind=kind, conn_id=1, stream_id=1, tag=1, detail=detail)


@pytest.mark.parametrize(
    ("kind", "detail", "path", "flags"),
    [
        # A connection that was up: `-` only for a clean end; the side that reset, seen from either node.
        ("stream_closed", "", Path.HBONE_CLIENT, "-"),
        ("stream_closed", "", Path.HBONE_SERVER, "-"),
        ("stream_closed", "reset by peer", Path.HBONE_CLIENT, "UR"),  # the destination side reset
        ("stream_closed", "socket error", Path.HBONE_SERVER, "UR"),  # the destination pod reset
        ("stream_closed", "socket error", Path.HBONE_CLIENT, "DR"),  # the client pod reset
        ("stream_closed", "reset by peer", Path.HBONE_SERVER, "DR"),  # the source side reset
        ("stream_closed", "connection closed", Path.HBONE_CLIENT, "UC"),
        ("stream_closed", "connection closed", Path.HBONE_SERVER, "DC"),
        ("stream_closed", "reset by agent", Path.HBONE_SERVER, "LR"),
        ("stream_closed", "something new", Path.HBONE_CLIENT, "LR"),  # unknown: never `-`
        ("splice_closed", "", Path.SPLICE, "-"),
        ("splice_closed", "a: Connection reset by peer", Path.SPLICE, "DR"),  # fd_a: the client
        ("splice_closed", "b: Broken pipe", Path.SPLICE, "UR"),
        ("splice_closed", "closed by agent", Path.SPLICE, "LR"),
        ("splice_closed", "epoll: Bad file descriptor", Path.SPLICE, "LR"),
    ],
)
def test_closed_flags(kind: str, detail: str, path: Path, flags: str) -> None:
    assert closed_flags(path, ending(_ev(kind, detail))) == flags


def test_engine_endings_are_named() -> None:
    assert ending(_ev("stream_closed", "")) is Ending.NORMAL
    assert ending(_ev("splice_closed", "a: x")) is Ending.SPLICE_A_FAILED
    assert ending(_ev("splice_closed", "ab: x")) is Ending.OTHER
