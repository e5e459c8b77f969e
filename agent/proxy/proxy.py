"""The proxy facade the agent daemon runs: listeners, control loop, engine, pool and connection table."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from agent.connections import ConnectionObserver
from agent.policy.decision import ConnectionAttrs
from agent.proxy import live
from agent.proxy.inbound import Inbound
from agent.proxy.limits import Budgets, Limits
from agent.proxy.loop import ControlLoop
from agent.proxy.outbound import Outbound
from agent.proxy.pool import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_STREAMS, Pool, PoolKey
from agent.proxy.runtime import AuditSink, Authorizer, MeshView, Runtime
from agent.proxy.sockets import format_authority, listener
from agent.proxy.status import closed_flags, refused_stream_flags
from agent.proxy.table import ConnectionTable, Entry, Path, towards_destination
from agent.proxy.tls import ProxyCredentials, TlsContexts
from agent.redirect.marks import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from api.jsonlog import batched
from native.engine import Ending, Engine, EngineError, Event, ending

log = logging.getLogger("ambit.proxy")

EVENT_BATCH = 256
PEER_IDENTITY_MISMATCH = "peer identity mismatch"  # the engine's conn_error detail (native/src/hbone.c)


def default_engine_threads() -> int:
    """Two engine loops when the machine has two CPUs or more: busy streams spread over pooled connections
    (see pool.py) then encrypt on both; more loops than that mostly add wake-ups on a node agent."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


@dataclass(frozen=True)
class Ports:
    outbound: int = OUTBOUND_PORT
    plaintext: int = INBOUND_PLAINTEXT_PORT
    hbone: int = HBONE_PORT


class Proxy:
    """Listeners 15001 (outbound capture), 15006 (inbound plaintext), 15008 (HBONE to local pods) of one node.

    `engine_threads`: the engine's loop threads (None: `default_engine_threads()`); `connections_per_key`:
    how many pooled connections concurrent streams of one (source pod, destination pod) spread over (None:
    2 x engine threads). `credentials`: `svid_for(SpiffeId)` and `trust_bundle_pem()` (the IdentityManager:
    local workloads present their own SVIDs on both sides of HBONE). `listen_ip`: the node's address
    (logged; HBONE is served on every local pod's address). `lookup(ip)`: the
    relay's on-demand lookup (blocking; its answer is merged into `state()`), asked off the loop when a
    destination is unknown. `audit(event, **fields)`: the agent's audit log, for identity refusals.
    `limits`: per source address / per peer identity limits (agent/proxy/limits.py; None: the defaults): the
    engine's share is set on the engine here, the rest are the proxy's budgets.
    Thread-safe: every public method may be called from any thread.
    """

    def __init__(
        self,
        node: str,
        state: Callable[[], MeshView],
        credentials: ProxyCredentials,
        authorizer: Authorizer,
        observer: ConnectionObserver,
        listen_ip: str,
        *,
        capture_ip: str = "0.0.0.0",
        ports: Ports = Ports(),  # noqa: B008 (frozen, immutable default)
        engine_threads: int | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
        connections_per_key: int | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        preserve_source_ip: bool = True,
        tls12: bool = False,
        lookup: Callable[[str], object] | None = None,
        audit: AuditSink | None = None,
        limits: Limits | None = None,
        fast_path: bool = True,
    ) -> None:
        self._listen_ip = listen_ip
        self._capture_ip = capture_ip
        self._ports = ports
        self._loop = ControlLoop(name=f"ambit-proxy-{node}")
        threads = engine_threads or default_engine_threads()
        limits = limits or Limits()
        engine = Engine(threads=threads)
        engine.set_limits(**limits.engine())  # the engine owns these (limits.py): set before any connection
        self._rt = Runtime(
            node=node,
            state=state,
            authorizer=authorizer,
            engine=engine,
            loop=self._loop,
            table=ConnectionTable(observer),
            pool=Pool(
                max_streams=max_streams, idle_timeout=idle_timeout, spread=connections_per_key or 2 * threads
            ),
            tls=TlsContexts(engine, credentials, tls12=tls12),
            preserve_source_ip=preserve_source_ip,
            lookup=lookup,
            audit_sink=audit,
            budgets=Budgets(limits),
        )
        self._inbound = Inbound(self._rt)
        self._outbound = Outbound(self._rt, self._inbound.serve)
        self._fast_path = fast_path
        self._listeners: list[socket.socket] = []
        self._handlers: dict[str, Callable[[Event], None]] = {
            "handshake_done": self._on_handshake_done,
            "peer_verified": self._inbound.on_peer_verified,
            "stream_request": self._inbound.on_stream_request,
            "stream_open": self._on_stream_open,
            "stream_refused": self._on_stream_refused,
            "stream_closed": self._on_stream_closed,
            "splice_closed": self._on_stream_closed,
            "conn_error": self._on_conn_error,
            "conn_closed": self._on_conn_closed,
            "peer_goaway": self._on_peer_goaway,
            "stream_accepted": self._inbound.on_stream_accepted,
            "upstream_failed": self._inbound.on_upstream_failed,
            "fast_open": self._outbound.fast.on_open,
            "fast_miss": self._outbound.fast.on_miss,
            "fast_accept": self._inbound.fast.on_accept,
        }
        # Why an engine connection failed (conn_error), until its conn_closed: the streams it cut say so.
        self._conn_errors: dict[int, str] = {}
        self._started = False
        self._seen_snapshot: object = None
        self._routed_snapshot: object = None

    @property
    def ports(self) -> Ports:
        """The bound ports (differ from the requested ones when those were 0)."""
        return self._ports

    def start(self) -> None:
        rt = self._rt
        rt.engine.start()
        rt.follow_trust(rt.state())  # before the first accept: foreign clients get a TLS alert
        try:
            out = listener(self._capture_ip, self._ports.outbound, transparent=True)
            self._listeners.append(out)
            plain = listener(self._capture_ip, self._ports.plaintext, transparent=True)
            self._listeners.append(plain)
            # HBONE arrives on `<local pod ip>:15008` (as ztunnel dials it), steered here by the capture
            # like 15001/15006: the listener is transparent on the capture address, never the node's alone.
            hbone = listener(self._capture_ip, self._ports.hbone, transparent=True)
            self._listeners.append(hbone)
        except BaseException:
            self._close_listeners()
            rt.engine.stop()
            raise
        self._ports = Ports(*(s.getsockname()[1] for s in (out, plain, hbone)))
        if self._fast_path:  # the engine accepts on 15001 (a duplicate fd: ours stays for stop to close)
            self._outbound.fast.start(os.dup(out.fileno()))
            self._inbound.fast.start()  # and served streams identical to allowed ones (fastpath_in.py)
        else:
            self._loop.add_reader(out.fileno(), lambda: self._outbound.on_readable(out))
        self._loop.add_reader(plain.fileno(), lambda: self._inbound.on_plaintext_readable(plain))
        self._loop.add_reader(hbone.fileno(), lambda: self._inbound.on_hbone_readable(hbone))
        self._loop.add_reader(rt.engine.eventfd, self._drain_events)
        self._loop.every_tick(self._on_tick)
        self._loop.start()
        self._started = True
        log.info("proxy on node %s (%s): outbound %s:%d, plaintext %s:%d, HBONE %s:%d", rt.node,
                 self._listen_ip, self._capture_ip, self._ports.outbound, self._capture_ip,
                 self._ports.plaintext, self._capture_ip, self._ports.hbone)  # fmt: skip

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._loop.stop()
        self._close_listeners()
        rt = self._rt
        rt.workers.shutdown(wait=False, cancel_futures=True)
        rt.engine.stop()
        with self._loop.lock:
            for entry in rt.table.entries():
                rt.table.finish(entry.tag, response_flags="LR", error="proxy stopped")
            rt.tls.close()

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()

    # --- control API ---------------------------------------------------------------------------

    def inbound_connections(self) -> list[tuple[int, ConnectionAttrs]]:
        """Live inbound connections and the attributes they were authorized on (for policy re-checks). The
        engine's queued events are handled first: informational ones wait up to a few ms for a wake-up
        (docs/engine.md), and a stream the fast path accepted must be re-checked too."""
        with self._loop.lock:
            self._drain_queued()
            return [(e.tag, e.attrs) for e in self._rt.table.entries() if e.attrs is not None]

    def close(self, conn_id: int, reason: str) -> None:
        """End one connection (e.g. a new policy denies it); reported with response flag DENY."""
        rt = self._rt
        with self._loop.lock:
            entry = rt.table.get(conn_id)
            if entry is None:
                return
            rt.table.mark(entry, "DENY", reason)
            rt.counters["closed_by_policy"] += 1
            try:
                if not entry.reported and entry.path is Path.SPLICE:
                    # Still connecting upstream: the connect callback finds the entry gone and drops it.
                    rt.table.finish(conn_id)
                elif entry.path is Path.SPLICE:
                    rt.engine.close(entry.engine_conn)  # the engine then reports splice_closed
                else:
                    # HBONE, also a served stream the engine may have answered 200 already (its connect to
                    # the pod done, the stream_accepted event not seen yet): reset; its close event follows.
                    rt.engine.reset_stream(entry.engine_conn, entry.engine_stream)
            except EngineError as exc:  # already gone: its close event is on the way
                log.debug("closing connection %d: %s", conn_id, exc)

    def mesh_changed(self) -> None:
        """A new snapshot or policy was applied: the engine's fast path entries stop at once (any thread;
        takes no proxy lock), and the next connection of each goes through Python again."""
        self._outbound.fast.invalidate()
        self._inbound.fast.invalidate()

    def rows(self) -> list[dict[str, object]]:
        """Live connections with their byte counts so far: the table is read under the control loop's
        lock, the engine asked after it is released (its loops answer; events keep being handled)."""
        with self._loop.lock:
            self._drain_queued()  # flows whose open event still waits for its wake-up are listed too
            pending = live.snapshot(self._rt.table)
        return live.rows(self._rt.engine, pending)

    def pool_rows(self) -> list[dict[str, object]]:
        with self._loop.lock:
            return self._rt.pool.rows()

    def engine_counters(self) -> dict[str, int]:
        return self._rt.engine.counters()

    def counters(self) -> dict[str, int]:
        """The proxy's own counters (accepts, refusals by reason, policy closes, ...)."""
        with self._loop.lock:
            out = dict(self._rt.counters)
            out["connections_active"] = len(self._rt.table)
            out["hbone_pool_connections"] = len(self._rt.pool.connections())
            out["hbone_pool_drained_moved"] = self._rt.pool.drained_moved
            out["fastpath_entries"] = len(self._outbound.fast)
            out["fastpath_in_entries"] = len(self._inbound.fast)
            out.update(self._rt.budgets.counters())
            out["observer_errors"] = self._rt.table.observer_errors
            out["control_loop_errors"] = self._loop.callback_errors
            return out

    # --- engine events (control loop thread, lock held) -----------------------------------------

    def _drain_queued(self) -> None:
        """Handle what the engine has queued now, off its wake-up (the caller holds the loop lock)."""
        if self._started:
            self._drain_events()  # each handler's failure is contained and counted there

    def _drain_events(self) -> None:
        with batched():  # the access log lines of this drain's records: one write, at its end
            self._drain_batch()

    def _drain_batch(self) -> None:
        while True:
            events = self._rt.engine.events(EVENT_BATCH)
            self._rt.counters["engine_event_drains"] += 1  # events per drain: what a wake-up carries
            self._rt.counters["engine_events"] += len(events)
            for ev in events:
                handler = self._handlers.get(ev.kind)
                if handler is None:
                    self._rt.counters["engine_events_unknown"] += 1
                    continue
                try:
                    handler(ev)
                except Exception:
                    self._rt.counters["engine_event_errors"] += 1
                    log.exception("handling engine event %s (conn %d) failed", ev.kind, ev.conn_id)
            if len(events) < EVENT_BATCH:
                return

    def _on_handshake_done(self, ev: Event) -> None:
        self._rt.pool.handshake_done(ev.conn_id, ev.tls_version, ev.tls_cipher, ev.peer_cert_sha256)

    def _on_stream_open(self, ev: Event) -> None:
        rt = self._rt
        entry = rt.table.get(ev.tag)
        if entry is None:
            return
        conn = rt.pool.get(entry.engine_conn)
        if conn is not None and entry.record.peer_cert_sha256 != conn.peer_cert_sha256:  # fast: already set
            rt.table.update_record(
                entry, tls_version=conn.tls_version, tls_cipher=conn.tls_cipher,
                peer_cert_sha256=conn.peer_cert_sha256,
            )  # fmt: skip
        rt.table.established(entry)

    def _on_stream_refused(self, ev: Event) -> None:
        entry = self._rt.table.get(ev.tag)
        if entry is None:
            return
        self._release(entry)
        flags = refused_stream_flags(ev.status)
        failed = self._conn_errors.get(entry.engine_conn)
        why = (
            f"HBONE connection failed: {failed}"
            if failed
            else f"stream refused ({ev.status or 'no status'}): {ev.detail}"
        )
        self._rt.table.finish(ev.tag, response_flags=flags, error=why)

    def _on_stream_closed(self, ev: Event) -> None:
        """A stream or splice that was up ended: its flag from how it ended and from our side of it
        (status.closed_flags); `-` only for a clean end."""
        entry = self._rt.table.get(ev.tag)
        if entry is None:
            return
        self._release(entry)
        sent, received = _bytes_towards_destination(entry, ev)
        end = ending(ev)
        why = ev.detail
        if end is Ending.CONNECTION_CLOSED and entry.engine_conn in self._conn_errors:
            why = f"HBONE connection failed: {self._conn_errors[entry.engine_conn]}"
        self._rt.table.finish(ev.tag, sent, received, response_flags=closed_flags(entry.path, end), error=why)

    def _on_conn_error(self, ev: Event) -> None:
        """The engine ends the connection's streams next (then conn_closed): those it cut say why. Streams
        that had already ended cleanly and only waited to deliver their last bytes stay `-` (the engine
        still delivers them)."""
        rt = self._rt
        rt.counters["hbone_connection_errors"] += 1
        self._conn_errors[ev.conn_id] = ev.detail
        self._outbound.fast.forget_conn(ev.conn_id)
        pooled = rt.pool.remove(ev.conn_id)  # no new streams on it
        if pooled is not None and ev.detail.startswith(PEER_IDENTITY_MISMATCH):
            # We refused the server: it is not the node the destination is scheduled on. A security event.
            rt.counters["hbone_server_identity_refused"] += 1
            presented = ev.peer_id or ev.detail.partition("got ")[2]
            rt.audit("hbone_server_refused", "hbone_server_refused", ev.detail, peer=pooled.peer,
                     peer_id=presented, expected_peer_id=pooled.peer_id, source=pooled.key[0])  # fmt: skip
        else:  # per connection, often a peer's problem: counted always, the text log rate-limited
            if pooled is None:
                self._inbound.on_conn_error(ev)  # a refused client certificate is audited
            rt.warn.log(logging.INFO, "hbone_connection_errors", "HBONE connection %d (peer %s) failed: %s",
                        ev.conn_id, ev.peer_id or "?", ev.detail)  # fmt: skip

    def _on_peer_goaway(self, ev: Event) -> None:
        """A graceful GOAWAY (ztunnel sends one when it drains): the engine refuses new streams on that
        connection, so the pool stops handing it out; its streams finish, new ones get a new connection, and
        the pool closes it once idle (draining, not forgotten: it is still ours to close)."""
        self._outbound.fast.forget_conn(ev.conn_id)
        if self._rt.pool.drain(ev.conn_id):
            self._rt.counters["hbone_peer_goaway"] += 1
            log.info("HBONE connection %d: peer %s sent GOAWAY: draining", ev.conn_id, ev.peer_id or "?")

    def _on_conn_closed(self, ev: Event) -> None:
        rt = self._rt
        self._outbound.fast.forget_conn(ev.conn_id)
        rt.pool.remove(ev.conn_id)
        self._inbound.on_conn_gone(ev.conn_id)
        failed = self._conn_errors.pop(ev.conn_id, None)
        why = f"HBONE connection failed: {failed}" if failed else ev.detail or "HBONE connection closed"
        # Streams end first; left here are ones whose open_stream reached the engine after the connection was
        # gone (their refusal follows): never up, an upstream failure; an established one was cut.
        for path in (Path.HBONE_CLIENT, Path.HBONE_SERVER):
            for entry in rt.table.on_engine_conn(ev.conn_id, path):
                never_up = path is Path.HBONE_CLIENT and not entry.reported
                flags = (
                    refused_stream_flags(None) if never_up else closed_flags(path, Ending.CONNECTION_CLOSED)
                )
                rt.table.finish(entry.tag, response_flags=flags, error=why)

    def _release(self, entry: Entry) -> None:
        if entry.path is Path.HBONE_CLIENT:
            self._rt.pool.release(entry.engine_conn)

    def _on_tick(self) -> None:
        self._close_idle()
        self._forget_departed()
        self._outbound.fast.tick()
        self._inbound.fast.tick()

    def _forget_departed(self) -> None:
        """Free the TLS contexts of workloads that left this node (one per local identity and role)."""
        rt = self._rt
        snap = rt.state()
        if snap is self._seen_snapshot:  # snapshots are immutable: a new one is a new object
            return
        self._seen_snapshot = snap
        td = snap.trust_domain
        rt.tls.forget({str(w.spiffe_id(td)) for w in snap.workloads.values() if w.node == rt.node})

    def _close_idle(self) -> None:
        snap = self._rt.state()
        if snap is not self._routed_snapshot:  # a new config: pooled connections to moved nodes drain
            self._routed_snapshot = snap
            self._rt.pool.drain_moved(lambda key: _hbone_route(snap, key))
        for conn_id in self._rt.pool.expired():
            try:
                self._rt.engine.close(conn_id)
            except EngineError:
                self._rt.pool.remove(conn_id)


def _hbone_route(snap: MeshView, key: PoolKey) -> tuple[str, str] | None:
    """Where a pooled connection's destination is now and who it must be: the pod's own address and the
    identity the mesh view gives it now (its key's while the view does not know the address: node-scoped
    views learn peers on demand, and forgetting one is no reason to drop its connection)."""
    dst_id, dst_ip = key[2], key[3]
    known = snap.workload_by_ip(dst_ip)
    return format_authority(dst_ip, HBONE_PORT), str(known.spiffe_id(snap.trust_domain)) if known else dst_id


def _bytes_towards_destination(entry: Entry, ev: Event) -> tuple[int, int]:
    """(sent to the destination, received from it) from the engine's counts at the end."""
    return towards_destination(entry.path, ev.bytes_in, ev.bytes_out)
