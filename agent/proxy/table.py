"""Live proxied connections: what the admin API lists, what a policy change re-checks and closes.

Every connection the proxy handles gets an entry keyed by a tag (the engine echoes it in its events).
An entry is reported to the observer as opened once its path is established (or at once when it ends
before that, e.g. denied), and as closed exactly once, with the byte counts from the engine.
Observers are other people's code: an exception there is logged and counted, never propagated. Every
close is also logged at DEBUG with both SPIFFE IDs, the response flags and the byte counts (the access log
is where connections are recorded; the text log keeps what an operator must act on).
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.connections import ConnectionClose, ConnectionObserver, ConnectionRecord
from agent.policy.decision import ConnectionAttrs

log = logging.getLogger("ambit.proxy")


class Path(enum.Enum):
    HBONE_CLIENT = "hbone-out"  # a stream we opened on a pooled connection
    HBONE_SERVER = "hbone-in"  # a stream a peer opened on 15008
    SPLICE = "splice"  # plaintext pump: passthrough or 15006

    __hash__ = object.__hash__  # members are singletons: a C identity hash (Enum's is Python, per lookup)


@dataclass
class Entry:
    tag: int
    record: ConnectionRecord
    path: Path
    attrs: ConnectionAttrs | None = None  # inbound only: what the policy decided on
    engine_conn: int = -1  # HBONE connection id or splice id
    engine_stream: int = -1
    started: float = field(default_factory=time.monotonic)
    reported: bool = False
    response_flags: str = "-"
    error: str = ""
    on_finish: Callable[[], None] | None = None  # gives back what the entry holds (a per-peer budget slot)


class ConnectionTable:
    def __init__(self, observer: ConnectionObserver) -> None:
        self._observer = observer
        self._entries: dict[int, Entry] = {}
        self._tags = itertools.count(1)
        self.observer_errors = 0

    def next_tag(self) -> int:
        return next(self._tags)

    def add(self, entry: Entry) -> Entry:
        if entry.record.conn_id != entry.tag:
            entry.record = entry.record.derive(conn_id=entry.tag)
        self._entries[entry.tag] = entry
        return entry

    def get(self, tag: int) -> Entry | None:
        return self._entries.get(tag)

    def update_record(self, entry: Entry, **changes: object) -> None:
        entry.record = entry.record.derive(**changes)

    def established(self, entry: Entry) -> None:
        """The path is up: report the connection as opened."""
        if not entry.reported:
            entry.reported = True
            try:
                self._observer.opened(entry.record)
            except Exception:  # an observer bug must not take the data path down
                self._observer_failed("opened")

    def mark(self, entry: Entry, response_flags: str, error: str) -> None:
        """Note why a connection is being ended before the engine reports its close."""
        entry.response_flags, entry.error = response_flags, error

    def finish(
        self,
        tag: int,
        bytes_sent: int = 0,
        bytes_received: int = 0,
        response_flags: str | None = None,
        error: str | None = None,
    ) -> Entry | None:
        """The connection ended: report it (opened first if it never was) and forget it."""
        entry = self._entries.pop(tag, None)
        if entry is None:
            return None
        if entry.on_finish is not None:
            entry.on_finish()
        if response_flags is not None and entry.response_flags == "-":
            entry.response_flags = response_flags
        if error and not entry.error:
            entry.error = error
        self.established(entry)
        close = ConnectionClose(
            entry.record, bytes_sent, bytes_received, time.monotonic() - entry.started, entry.response_flags,
            entry.error,
        )  # fmt: skip
        try:
            self._observer.closed(close)
        except Exception:
            self._observer_failed("closed")
        if not log.isEnabledFor(logging.DEBUG):  # its arguments alone cost a microsecond per connection
            return entry
        r = entry.record
        # DEBUG: one line per connection is the access log's job (observer); the text log stays readable.
        log.debug("%s %s:%d (%s) -> %s:%d (%s) flags=%s sent=%d received=%d%s", r.direction.value,
                 r.source_ip, r.source_port, r.source_principal or "-", r.destination_ip, r.destination_port,
                 r.destination_principal or "-", close.response_flags, bytes_sent, bytes_received,
                 f" error={close.error}" if close.error else "")  # fmt: skip
        return entry

    def reject(self, record: ConnectionRecord, response_flags: str, error: str) -> None:
        """A connection refused before any path existed (denied, unknown destination, ...)."""
        tag = self.next_tag()
        self.add(Entry(tag, record, Path.SPLICE))
        self.finish(tag, response_flags=response_flags, error=error)

    def on_engine_conn(self, engine_conn: int, path: Path) -> list[Entry]:
        return [e for e in self._entries.values() if e.engine_conn == engine_conn and e.path is path]

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def _observer_failed(self, what: str) -> None:
        self.observer_errors += 1
        log.exception("connection observer failed in %s", what)

    def rows(self) -> list[dict[str, object]]:
        now = time.monotonic()
        return [row(e, now) for e in self._entries.values()]


def row(e: Entry, now: float) -> dict[str, object]:
    """The admin view of one live connection as the table knows it (live byte counts: proxy/live.py)."""
    r = e.record
    return {
        "id": e.tag,
        "direction": r.direction.value,
        "source": _endpoint(r.source_ip, r.source_port),
        "destination": _endpoint(r.destination_ip, r.destination_port),
        "state": "established" if e.reported else "connecting",
        "age_s": round(now - e.started, 1),
        "source_workload": r.source_workload,
        "destination_workload": r.destination_workload,
        "source_principal": r.source_principal,
        "destination_principal": r.destination_principal,
        "path": e.path.value,
    }


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def towards_destination(path: Path, bytes_in: int, bytes_out: int) -> tuple[int, int]:
    """(sent to the destination, received from it) from the engine's counts of a stream or splice.

    Streams count DATA received from (bytes_in) and sent to (bytes_out) the HBONE peer, which is the
    destination's side for our client streams and the source's side for streams we serve. Splices count
    what was read from fd_a (bytes_in) and written to it (bytes_out); fd_a is always the client.
    """
    if path is Path.HBONE_CLIENT:
        return bytes_out, bytes_in
    return bytes_in, bytes_out
