"""Python's half of the engine's inbound fast path (native/src/fastpath_in.c, docs/engine.md "Inbound fast
path"): served CONNECT streams on 15008 the engine accepts without a `stream_request`.

An entry says: on this served HBONE connection, a CONNECT with exactly this :authority whose `forwarded`
claims exactly this source IP (or has none) is accepted as the ordinary path (inbound.py) accepted one,
connecting to the same pod from the same source address. It is keyed by everything that decision read
from the stream (the connection stands for its verified peer identity and the address it was dialled to;
the snapshot, policies and identities are the generation's), and installed only:

- after the ordinary path allowed and accepted an identical stream itself, in the engine generation read
  before that decision (a new snapshot, policy or identity in between: the engine refuses it);
- when nothing else fed the decision: the authorizer says an identical connection gets the identical
  decision (no RegoPolicy in the mesh, no audit of every decision: `reusable`), the decision was a plain
  ALLOW (not AUDIT-matched, no dry-run difference), the source is a known workload (so the record's
  source workload does not come from the per-request baggage), and the claim, when present, is an IPv4
  address the engine parses the same way (anything else the engine sends to Python, uncounted here).

Invalidation: `Proxy.mesh_changed` bumps the engine's generation (any thread); on the loop a new
snapshot object does too, and stale entries, those of a connection that closed or failed, and those of a
destination whose server certificate rotated or went away are removed. A stream the engine accepted in a
generation that ended before Python saw its event is decided again by the policy (as the policy re-check
of live connections does) and reset when now denied: the re-check may have run before it was in the table.

Bounds: at most `capacity` entries (the engine refuses more), each allowed `credits` streams before
Python looks again; the peer's stream budget (hbone_source_streams) is reserved up front, one unit per
credit, and what an entry did not use is given back when it is removed.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

from agent.connections import ConnectionRecord
from agent.policy.decision import ConnectionAttrs, Decision
from agent.proxy.runtime import MeshView, Runtime
from agent.proxy.table import Entry, Path
from agent.proxy.telemetry import trace_id
from api.spiffe import SpiffeId
from native.engine import EngineError, Event

log = logging.getLogger("ambit.proxy")

DEFAULT_CAPACITY = 4096
DEFAULT_CREDITS = 128  # of hbone_streams_per_source's 8,192: a busy peer's burst outruns a top-up

InKey = tuple[int, str, str]  # (served connection id, raw :authority, claimed source IP or "")


@dataclass(frozen=True)
class Allowed:
    """What the ordinary path decided and did for one served stream, for `offer`."""

    generation: int  # the engine's, read before the decision
    snapshot: MeshView  # the mesh view the decision read
    conn_id: int
    authority: str  # raw, as the stream carried it
    claim_ip: str  # the claimed source `forwarded` named ("" without the header)
    attrs: ConnectionAttrs
    decision: Decision
    record: ConnectionRecord
    destination: tuple[str, int]
    spoof: str | None  # the source address the pod sees (None: the agent's)
    mark: int
    peer_ip: str  # the HBONE peer: the stream budget's key
    peer_port: int
    port_from_claim: bool  # the record's source port is the claim's (when it names one)
    local: SpiffeId  # the destination identity whose certificate the connection was served with


@dataclass
class InEntry:
    id: int
    key: InKey
    allowed: Allowed
    fields: dict[str, Any]  # the record's fields; per stream: tag, source port, start time, trace id
    tls_generation: int
    fallback_port: int  # the record's source port when the claim names none (inbound._source_port)
    held: int  # budget units reserved for credits not yet turned into streams
    removed: bool = False


class InboundFastPath:
    def __init__(self, rt: Runtime, capacity: int = DEFAULT_CAPACITY, credits: int = DEFAULT_CREDITS) -> None:
        self._rt = rt
        self.capacity = capacity
        self.credits = credits
        self.enabled = False
        self._ids = itertools.count(1)
        self._by_key: dict[InKey, InEntry] = {}
        self._by_id: dict[int, InEntry] = {}  # also removed entries whose units are still in flight
        self._by_conn: dict[int, set[InKey]] = {}
        self._snapshot: object = None

    def start(self) -> None:
        self._rt.engine.fastin_set_capacity(self.capacity)
        self._snapshot = self._rt.state()
        self.enabled = True

    def __len__(self) -> int:
        return len(self._by_key)

    def generation(self) -> int:
        """Read before the decision an entry will encode (see `offer`); -1 while disabled."""
        return self._rt.engine.fastin_generation() if self.enabled else -1

    # --- the ordinary path offers what it allowed ----------------------------------------------------

    def offer(self, allowed: Allowed) -> None:
        rt = self._rt
        if not self.enabled or allowed.generation < 0 or not self._eligible(allowed):
            return
        key = (allowed.conn_id, allowed.authority, allowed.claim_ip)
        current = self._by_key.get(key)
        if current is not None:
            if current.allowed.generation == allowed.generation:
                return
            self._remove(current)
        if len(self._by_key) >= self.capacity:
            rt.counters["fastpath_in_table_full"] += 1
            return
        budget = rt.budgets.hbone_source_streams
        credits = budget.room(allowed.peer_ip, self.credits)
        tls_generation = rt.tls.server_generation(allowed.local)
        if credits < 1 or tls_generation < 0:
            return  # the peer is near its budget: each stream is checked the ordinary way
        fields = {name: getattr(allowed.record, name) for name in allowed.record.__dataclass_fields__}
        fallback = allowed.peer_port if allowed.record.source_ip == allowed.peer_ip else 0
        entry = InEntry(next(self._ids), key, allowed, fields, tls_generation, fallback, held=credits)
        try:
            rt.engine.fastin_put(
                entry.id, allowed.generation, allowed.conn_id, allowed.authority, allowed.claim_ip,
                allowed.destination, allowed.spoof, allowed.mark, credits,
            )  # fmt: skip
        except EngineError as exc:  # stale generation (a change meanwhile), table full, ...
            rt.counters["fastpath_in_install_refused"] += 1
            log.debug("inbound fast path entry for %s refused: %s", key, exc)
            return
        for _ in range(credits):
            budget.take(allowed.peer_ip)
        self._by_key[key] = entry
        self._by_id[entry.id] = entry
        self._by_conn.setdefault(allowed.conn_id, set()).add(key)
        rt.counters["fastpath_in_installed"] += 1

    def _eligible(self, allowed: Allowed) -> bool:
        d = allowed.decision
        if not d.allow or d.audited or d.dry_run or allowed.snapshot is not self._rt.state():
            return False
        if allowed.claim_ip and (":" in allowed.claim_ip or "." not in allowed.claim_ip):
            return False  # the engine reads IPv4 claims only: an IPv6 one would never match
        return self._rt.reusable(allowed.attrs, d)

    # --- engine events -----------------------------------------------------------------------------

    def on_accept(self, ev: Event) -> None:
        """The engine accepted a stream for entry `ev.bytes_in` (the claim's port in `ev.status`) and its
        connect to the pod ended (`ev.bytes_out` 0: connected, the stream_accepted of the ordinary path;
        1: failed, upstream_failed follows): the same table entry, budget unit and record as the ordinary
        path gives it."""
        rt = self._rt
        fe = self._spent(ev.bytes_in)
        if fe is None:  # cannot happen: entries stay known while their units are in flight
            rt.counters["fastpath_in_unknown_entry"] += 1
            rt.engine.reset_stream(ev.conn_id, ev.stream_id)
            return
        a = fe.allowed
        port = ev.status if a.port_from_claim and ev.status else fe.fallback_port
        record = ConnectionRecord(**{
            **fe.fields, "conn_id": ev.tag, "source_port": port, "start_time": time.time(),
            "trace_id": trace_id(ev.traceparent),
        })  # fmt: skip
        entry = Entry(ev.tag, record, Path.HBONE_SERVER, a.attrs, ev.conn_id, ev.stream_id)
        budget, peer = rt.budgets.hbone_source_streams, a.peer_ip
        entry.on_finish = lambda: budget.give_back(peer)  # the unit reserved for this credit
        rt.table.add(entry)
        rt.counters["fastpath_in_accepted"] += 1
        if ev.bytes_out == 0:  # connected and answered 200 (else upstream_failed follows: inbound.py)
            rt.counters["inbound_hbone_streams"] += 1
            rt.table.established(entry)
        if fe.removed or self._stale(fe):
            self._decide_again(entry)

    def _spent(self, entry_id: int) -> InEntry | None:
        """One of the entry's credits became a stream (its budget unit goes with the stream): a removed
        entry is forgotten with its last unit, a live one topped up once half its credits are spent."""
        fe = self._by_id.get(entry_id)
        if fe is not None:
            fe.held -= 1
            if not fe.removed:
                if fe.held <= self.credits // 2:
                    self._top_up(fe)
            elif not fe.held:
                del self._by_id[entry_id]
        return fe

    def _stale(self, fe: InEntry) -> bool:
        """Whether the world the entry encodes may have changed since it was installed."""
        if self._rt.state() is not self._snapshot:
            self.check_snapshot()
            return True
        return self._rt.engine.fastin_generation() != fe.allowed.generation

    def _decide_again(self, entry: Entry) -> None:
        """Accepted in a generation that has ended: the current policy decides, as it re-checks live
        connections; denied now, the stream is reset (its close event reports DENY)."""
        rt = self._rt
        assert entry.attrs is not None
        rt.counters["fastpath_in_redecided"] += 1
        decision = rt.authorize(entry.attrs)
        if decision.allow:
            return
        rt.counters["closed_by_policy"] += 1
        rt.table.mark(entry, "DENY", f"denied after policy change: {decision.reason}")
        try:
            rt.engine.reset_stream(entry.engine_conn, entry.engine_stream)
        except EngineError as exc:  # already gone: its close event is on the way
            log.debug("resetting stream %d: %s", entry.tag, exc)

    def _top_up(self, fe: InEntry) -> None:
        """Half its credits spent: more (their budget units reserved), one engine call per half."""
        budget, peer = self._rt.budgets.hbone_source_streams, fe.allowed.peer_ip
        more = budget.room(peer, self.credits - fe.held)
        if more < 1 or not self._rt.engine.fastin_add_credits(fe.id, more):
            return
        for _ in range(more):
            budget.take(peer)
        fe.held += more

    # --- invalidation ------------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Any thread: every entry stops matching at once; they are removed on the loop (tick)."""
        if self.enabled:
            self._rt.engine.fastin_invalidate()

    def check_snapshot(self) -> None:
        """On the loop: a new snapshot object (for callers that do not say `Proxy.mesh_changed`, e.g. an
        on-demand lookup merged into the view) stops and removes every entry."""
        if not self.enabled:
            return
        snap = self._rt.state()
        if snap is not self._snapshot:
            self._snapshot = snap
            self._rt.engine.fastin_invalidate()
            self.clear()

    def tick(self) -> None:
        """Each loop tick: a new snapshot, a stale generation, or a destination whose server certificate
        rotated or went away removes the entries concerned."""
        if not self.enabled:
            return
        self.check_snapshot()
        generation = self._rt.engine.fastin_generation()
        tls = self._rt.tls
        for fe in list(self._by_key.values()):
            rotated = tls.server_generation(fe.allowed.local) != fe.tls_generation
            if rotated or fe.allowed.generation != generation:
                self._remove(fe)

    def forget_conn(self, conn_id: int) -> None:
        """A served connection closed, failed or was refused: its entries go with it."""
        for key in list(self._by_conn.pop(conn_id, ())):
            fe = self._by_key.get(key)
            if fe is not None:
                self._remove(fe)

    def clear(self) -> None:
        for fe in list(self._by_key.values()):
            self._remove(fe)

    def reclaim(self, peer_ip: str) -> int:
        """`peer_ip` has spent its stream budget: the credits its entries hold but no stream uses yet go
        back to it (those entries are removed; the next allowed stream installs one anew with at most half
        of what is left), so a peer below its limit is never refused for the fast path's reservation (as
        the outbound fast path's reclaim). How many units came back."""
        budget = self._rt.budgets.hbone_source_streams
        before = budget.held(peer_ip)
        for fe in [fe for fe in self._by_key.values() if fe.allowed.peer_ip == peer_ip]:
            self._remove(fe)
        freed = before - budget.held(peer_ip)
        if freed:
            self._rt.counters["fastpath_in_reclaimed"] += freed
        return freed

    def _remove(self, fe: InEntry) -> None:
        left = self._rt.engine.fastin_remove(fe.id)
        self._by_key.pop(fe.key, None)
        keys = self._by_conn.get(fe.key[0])
        if keys is not None:
            keys.discard(fe.key)
            if not keys:
                del self._by_conn[fe.key[0]]
        fe.removed = True
        budget, peer = self._rt.budgets.hbone_source_streams, fe.allowed.peer_ip
        for _ in range(max(0, left)):
            budget.give_back(peer)
        fe.held -= max(0, left)
        if fe.held <= 0:
            self._by_id.pop(fe.id, None)
        self._rt.counters["fastpath_in_removed"] += 1
