"""Live byte counts and state of the proxy's open connections, for the admin view (`ambit debug connections`).

The connection table knows each connection's path and engine ids; only the engine knows how many bytes a
stream or splice carried so far (until it ends, when its close event says). `Engine.flow_stats` asks the
loop threads that own them: one query per admin request whatever the number of connections (the wrapper
batches by 4,096), never a poll per connection.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from agent.proxy.table import ConnectionTable, Entry, Path, row, towards_destination
from native.engine import Engine, EngineError, FlowStats

log = logging.getLogger("ambit.proxy")

# The engine's "open" is what the table calls an established path; its other states keep their names.
_STATES = {"open": "established"}


@dataclass(frozen=True)
class Pending:
    """One live connection's row and where the engine counts its bytes (None: no engine object yet)."""

    row: dict[str, object]
    path: Path
    flow: tuple[int, int] | None
    reported: bool


def snapshot(table: ConnectionTable) -> list[Pending]:
    """The table's rows and engine ids (call with the control loop's lock held)."""
    now = time.monotonic()
    return [Pending(row(e, now), e.path, _flow(e), e.reported) for e in table.entries()]


def rows(engine: Engine, pending: list[Pending]) -> list[dict[str, object]]:
    """The rows with `bytes_sent`/`bytes_received` so far (towards / from the destination, as the access
    record counts them) and the engine's state. A connection the engine no longer holds is ending (its
    close event is on the way): "closing", counts unknown (None) until the access record has them."""
    asked = [(i, p.flow) for i, p in enumerate(pending) if p.flow is not None]
    try:
        answers = dict(zip((i for i, _ in asked), engine.flow_stats([f for _, f in asked]), strict=True))
    except EngineError as exc:  # stopped, or a loop did not answer: rows without live counts
        log.debug("live connection counts unavailable: %s", exc)
        answers = {}
    return [_merge(p, answers.get(i)) for i, p in enumerate(pending)]


def _flow(e: Entry) -> tuple[int, int] | None:
    if e.engine_conn < 0:
        return None
    if e.path is Path.SPLICE:
        return e.engine_conn, 0
    return (e.engine_conn, e.engine_stream) if e.engine_stream >= 0 else None


def _merge(p: Pending, stats: FlowStats | None) -> dict[str, object]:
    state = p.row["state"]
    sent: int | None = None
    received: int | None = None
    if stats is not None and stats.state != "unknown":
        state = _STATES.get(stats.state, stats.state)
        sent, received = towards_destination(p.path, stats.bytes_in, stats.bytes_out)
    elif p.flow is None and not p.reported:  # still connecting upstream: nothing carried yet
        sent = received = 0
    elif stats is not None:  # the engine ended it: the close event (and the access record) follows
        state = "closing"
    out: dict[str, object] = {}
    for key, value in p.row.items():  # the counts beside state and age, before the identities
        out[key] = state if key == "state" else value
        if key == "age_s":
            out["bytes_sent"], out["bytes_received"] = sent, received
    return out
