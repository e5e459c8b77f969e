"""Python's half of the engine's outbound fast path (native/src/fastpath.c, docs/engine.md "Fast path").

The engine accepts on 15001 itself. For a (source pod ip, destination ip:port) installed here it opens
the CONNECT stream on one of the key's pooled connections without calling Python, and reports it
(`fast_open`) before the stream's own events; anything else arrives as `fast_miss` with the accepted fd and
takes the ordinary path (outbound.py), which is also what installs entries: only after routing a
connection of that source and destination itself (a local workload to an enrolled workload's own address,
not a Service address, whose endpoint is chosen per connection), on a connection whose handshake is done.

Invalidation: the engine's generation is read before each routing decision and an entry carries it; a new
snapshot (`Proxy.mesh_changed`, and the snapshot object changing), credentials rotating (the pool's
generation of the source's TLS context) or a pooled connection draining, closing or filling up removes
the entries that name it, and a stale entry is a miss in the engine, never a passthrough.

Bounds: at most `capacity` entries (the engine refuses more), each allowed `credits` streams before Python
looks again. The source's outbound connection budget is reserved up front, one unit per credit, so fast
connections never take a pod past its limit; a fast connection takes its unit from the entry, and what an
entry did not use is given back when it is removed.
"""

from __future__ import annotations

import itertools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.connections import ConnectionRecord
from agent.proxy.pool import PooledConnection, PoolKey
from agent.proxy.runtime import Runtime
from agent.proxy.table import Entry, Path
from agent.proxy.telemetry import trace_id
from api.spiffe import SpiffeId
from native.engine import FAST_MAX_CONNS, EngineError, Event

log = logging.getLogger("ambit.proxy")

DEFAULT_CAPACITY = 1024
DEFAULT_CREDITS = 64

FastKey = tuple[str, str, int]  # (source ip, destination ip, destination port)


@dataclass
class FastEntry:
    id: int
    key: FastKey
    pool_key: PoolKey
    source: SpiffeId
    tls_generation: int  # the source's TLS context generation its connections were made with
    generation: int  # the engine's fast path generation it was installed in
    template: ConnectionRecord  # what each of its connections records (ports, times, trace id set per one)
    conns: tuple[int, ...]
    held: int  # budget units reserved for credits not yet turned into connections
    removed: bool = False


@dataclass(frozen=True)
class Route:
    """What the ordinary path decided for one connection, for `offer`."""

    key: FastKey
    pool_key: PoolKey
    source: SpiffeId
    tls_generation: int
    generation: int
    record: ConnectionRecord
    authority: str  # the CONNECT authority, "<destination ip>:<port>"
    baggage: str


class FastPath:
    def __init__(
        self,
        rt: Runtime,
        on_miss: Callable[[socket.socket], None],
        capacity: int = DEFAULT_CAPACITY,
        credits: int = DEFAULT_CREDITS,
    ) -> None:
        self._rt = rt
        self._on_miss = on_miss
        self.capacity = capacity
        self.credits = credits
        self.enabled = False
        self._ids = itertools.count(1)
        self._by_key: dict[FastKey, FastEntry] = {}
        self._by_id: dict[int, FastEntry] = {}  # also removed entries whose units are still in flight
        self._snapshot: object = None

    def start(self, listener_fd: int) -> None:
        """Hand the engine (a duplicate of) the outbound listener: it accepts from now on."""
        self._rt.engine.fastpath_set_capacity(self.capacity)
        self._rt.engine.fastpath_listen(listener_fd)
        self._snapshot = self._rt.state()
        self.enabled = True

    def __len__(self) -> int:
        return len(self._by_key)

    # --- the ordinary path offers what it routed ------------------------------------------------------

    def generation(self) -> int:
        """Read before the routing decision an entry will encode (see `offer`)."""
        return self._rt.engine.fastpath_generation() if self.enabled else -1

    def offer(self, route: Route, conn: PooledConnection) -> None:
        """A connection was routed to `conn` the ordinary way: install (or refresh) its key's entry."""
        rt = self._rt
        if not self.enabled or route.generation < 0 or not conn.ready:
            return
        current = self._by_key.get(route.key)
        conns = self._usable(route.pool_key, route.tls_generation)
        if current is not None:
            if current.generation == route.generation and current.conns == conns:
                return
            self._remove(current)
        if not conns:
            return
        if len(self._by_key) >= self.capacity:
            rt.counters["fastpath_table_full"] += 1
            return
        budget = rt.budgets.outbound_sources
        src_ip = route.key[0]
        credits = budget.room(src_ip, self.credits)
        if credits < 1:
            return  # the source is near its budget: each new connection is checked the ordinary way
        entry = FastEntry(
            next(self._ids), route.key, route.pool_key, route.source, route.tls_generation, route.generation,
            route.record, conns, held=credits,
        )  # fmt: skip
        try:
            rt.engine.fastpath_put(
                entry.id, route.generation, src_ip, route.key[1], route.key[2], conns, spread=rt.pool.spread,
                credits=credits, authority=route.authority, forwarded=src_ip,
                headers=(("baggage", route.baggage),),
            )  # fmt: skip
        except EngineError as exc:  # a stale generation (a new snapshot meanwhile), the table full, ...
            rt.counters["fastpath_install_refused"] += 1
            log.debug("fast path entry for %s refused: %s", route.key, exc)
            return
        for _ in range(credits):
            budget.take(src_ip)
        self._by_key[route.key] = entry
        self._by_id[entry.id] = entry
        rt.counters["fastpath_installed"] += 1

    def _usable(self, key: PoolKey, tls_generation: int) -> tuple[int, ...]:
        pool = self._rt.pool
        live = [
            c
            for c in pool.connections_of(key)
            if c.ready and not (c.draining or c.closing) and c.generation == tls_generation
            and c.streams < pool.max_streams
        ]  # fmt: skip
        return tuple(sorted(c.conn_id for c in live))[:FAST_MAX_CONNS]

    # --- engine events -----------------------------------------------------------------------------

    def on_open(self, ev: Event) -> None:
        """The engine opened a stream for entry `ev.bytes_in` (client port `ev.status`): the same table
        entry, budget unit, pool slot and record as the ordinary path gives it."""
        rt = self._rt
        fe = self._by_id.get(ev.bytes_in)
        if fe is None:  # cannot happen: entries stay known while their units are in flight
            rt.counters["fastpath_unknown_entry"] += 1
            rt.engine.reset_stream(ev.conn_id, ev.stream_id)
            return
        fe.held -= 1
        if fe.removed and fe.held == 0:
            del self._by_id[fe.id]
        elif not fe.removed and fe.held <= self.credits // 2:
            self._top_up(fe)
        rt.counters["outbound_accepted"] += 1
        rt.counters["fastpath_opened"] += 1
        conn = rt.pool.reserve(ev.conn_id)
        template = fe.template
        record = template.derive(
            conn_id=ev.tag, source_port=ev.status, start_time=time.time(), trace_id=trace_id(ev.traceparent),
            tls_version=template.tls_version if conn is None else conn.tls_version,
            tls_cipher=template.tls_cipher if conn is None else conn.tls_cipher,
            peer_cert_sha256=template.peer_cert_sha256 if conn is None else conn.peer_cert_sha256,
        )  # fmt: skip
        entry = Entry(ev.tag, record, Path.HBONE_CLIENT, engine_conn=ev.conn_id, engine_stream=ev.stream_id)
        src_ip, budget = fe.key[0], rt.budgets.outbound_sources
        entry.on_finish = lambda: budget.give_back(src_ip)  # the unit reserved for this credit
        rt.table.add(entry)
        # Up from here: its CONNECT is on a verified pooled connection, and the engine sends no stream_open
        # for a fast stream (one event less per connection); a refusal still ends it with its flag.
        rt.table.established(entry)
        rt.counters["outbound_hbone_streams"] += 1
        if conn is None or conn.streams >= rt.pool.max_streams:
            self.forget_conn(ev.conn_id)
        self.check_snapshot()

    def _top_up(self, fe: FastEntry) -> None:
        """Half its credits spent: grant more (reserving their budget units), one engine call per half."""
        budget = self._rt.budgets.outbound_sources
        src_ip = fe.key[0]
        more = budget.room(src_ip, self.credits - fe.held)
        if more < 1 or not self._rt.engine.fastpath_add_credits(fe.id, more):
            return  # near the budget, or removed: new connections take the ordinary path
        for _ in range(more):
            budget.take(src_ip)
        fe.held += more

    def on_miss(self, ev: Event) -> None:
        """An accepted connection the engine did not open: the ordinary path takes it."""
        sock = socket.socket(fileno=ev.status)
        try:
            self._on_miss(sock)
        except OSError as exc:  # e.g. the client reset before we looked at it
            log.debug("accepted connection gone: %s", exc)
            sock.close()
        except Exception:
            log.exception("handling an accepted connection failed")
            sock.close()

    # --- invalidation ------------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Any thread: every entry stops at once (the engine's generation); they are removed on the loop."""
        if self.enabled:
            self._rt.engine.fastpath_invalidate()

    def check_snapshot(self) -> None:
        """On the loop: a new snapshot object (for callers that do not say `Proxy.mesh_changed`) stops and
        removes every entry."""
        if not self.enabled:
            return
        snap = self._rt.state()
        if snap is not self._snapshot:
            self._snapshot = snap
            self._rt.engine.fastpath_invalidate()
            self.clear()

    def _check_generation(self) -> None:
        """Entries an invalidation stopped are misses in the engine already; here they are removed."""
        generation = self._rt.engine.fastpath_generation()
        for fe in [fe for fe in self._by_key.values() if fe.generation != generation]:
            self._remove(fe)

    def tick(self) -> None:
        """Each loop tick: a new snapshot, a rotated source certificate, or a connection no longer usable
        (drained, closing, full, gone) removes the entries concerned."""
        self.check_snapshot()
        self._check_generation()
        for fe in list(self._by_key.values()):
            try:
                rotated = self._rt.tls.client(fe.source)[1] != fe.tls_generation
            except Exception:  # no SVID any more: nothing to present
                rotated = True
            if rotated or self._usable(fe.pool_key, fe.tls_generation) != fe.conns:
                self._remove(fe)

    def reclaim(self, source_ip: str) -> int:
        """`source_ip` has spent its outbound budget: the credits its entries hold but no connection uses
        yet go back to it (those entries are removed; the next routed connection installs one anew with
        at most half of what is left), so a pod below its limit is never refused for the fast path's
        reservation. How many units came back."""
        budget = self._rt.budgets.outbound_sources
        before = budget.held(source_ip)
        for fe in [fe for fe in self._by_key.values() if fe.key[0] == source_ip]:
            self._remove(fe)
        freed = before - budget.held(source_ip)
        if freed:
            self._rt.counters["fastpath_reclaimed"] += freed
        return freed

    def forget_conn(self, conn_id: int) -> None:
        """A pooled connection drained, failed, closed or filled up: no fast stream on it any more."""
        for fe in [fe for fe in self._by_key.values() if conn_id in fe.conns]:
            self._remove(fe)

    def clear(self) -> None:
        for fe in list(self._by_key.values()):
            self._remove(fe)

    def _remove(self, fe: FastEntry) -> None:
        left = self._rt.engine.fastpath_remove(fe.id)
        self._by_key.pop(fe.key, None)
        fe.removed = True
        budget = self._rt.budgets.outbound_sources
        for _ in range(max(0, left)):
            budget.give_back(fe.key[0])
        fe.held -= max(0, left)
        if fe.held <= 0:
            self._by_id.pop(fe.id, None)
        self._rt.counters["fastpath_removed"] += 1
