"""What the proxy's handlers share: the engine, the control loop, the tables and the mesh view."""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from agent.connections import ConnectionRecord, Direction
from agent.policy.decision import ConnectionAttrs, Decision
from agent.proxy.accept import Acceptor
from agent.proxy.limits import Budget, Budgets, Limits
from agent.proxy.lograte import RateLimitedLog
from agent.proxy.loop import ControlLoop
from agent.proxy.pool import Pool
from agent.proxy.sockets import original_destination, peer_address
from agent.proxy.table import ConnectionTable, Entry
from agent.proxy.telemetry import DEFAULT_CLUSTER
from agent.proxy.tls import TlsContexts
from api.resources.workload import Namespace, Service, Workload
from api.spiffe import TrustDomains
from native.engine import Engine, EngineError

log = logging.getLogger("ambit.proxy")
audit_log = logging.getLogger("ambit.audit")

MAX_OFF_LOOP_KEYS = 1024  # distinct blocking calls (SVID fetches, lookups) waiting for the two workers


class OverloadedError(Exception):
    """Too much blocking work is already waiting: refused rather than queued."""


AuditSink = Callable[..., None]  # audit(event, **fields): the agent's JSON audit log (AuditLog.record)


class MeshView(Protocol):
    """The parts of agent.state.MeshSnapshot the proxy reads."""

    @property
    def version(self) -> int: ...

    @property
    def trust_domain(self) -> str: ...

    @property
    def workloads(self) -> Mapping[str, Workload]: ...

    # Never blocks: the loop must not wait on the relay; unknown peers go through `lookup`, off the loop.
    def workload_by_ip(self, ip: str) -> Workload | None: ...

    def service_by_ip(self, ip: str) -> Service | None: ...

    def service_endpoints(self, service: Service) -> list[Workload]: ...

    def node_address(self, node_name: str) -> str | None: ...

    def in_mesh_range(self, ip: str) -> bool: ...

    def is_node_address(self, ip: str) -> bool: ...

    @property
    def trust(self) -> TrustDomains: ...

    def namespace_of(self, w: Workload) -> Namespace | None: ...


class Authorizer(Protocol):
    def authorize(self, attrs: ConnectionAttrs) -> Decision: ...

    def mtls_mode(self, workload: Workload, port: int) -> str: ...


@dataclass
class Runtime:
    node: str
    state: Callable[[], MeshView]
    authorizer: Authorizer
    engine: Engine
    loop: ControlLoop
    table: ConnectionTable
    pool: Pool
    tls: TlsContexts
    preserve_source_ip: bool
    cluster: str = DEFAULT_CLUSTER  # k8s.cluster.name in the baggage HBONE streams carry
    # On-demand lookup of an unknown IP (RelayClient.lookup): blocking; merges what it finds into state().
    lookup: Callable[[str], object] | None = None
    workers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="ambit-proxy-fetch")
    )
    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    # Warnings a peer or an outage can repeat at will: one line per kind per interval (counters stay exact).
    warn: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log))
    audit_sink: AuditSink | None = None
    budgets: Budgets = field(default_factory=lambda: Budgets(Limits()))
    _audit_text: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(audit_log))
    _waiting: dict[str, list[Callable[[Exception | None], None]]] = field(default_factory=dict)
    _trust_seen: object = None  # the snapshot follow_trust last looked at
    _peer_domains: list[str] | None = None

    def __post_init__(self) -> None:
        self._acceptor = Acceptor(self.loop, self.counters, self.warn)

    def follow_trust(self, snap: MeshView) -> None:
        """Hand the engine the trust domains of `snap` (this mesh's and its aliases; none before a config):
        it refuses, in the handshake, every client that is no workload of them (`TrustDomains.workload`, the
        same rule, is checked again at peer_verified). Called before every served handshake, so the first
        connections after a config change are judged by it. Cheap: snapshots are immutable objects."""
        if snap is self._trust_seen:
            return
        self._trust_seen = snap
        domains = sorted(d for d in {snap.trust.local, *snap.trust.aliases} if d)
        if domains != self._peer_domains:
            self.engine.set_peer_trust_domains(domains)
            self._peer_domains = domains

    def accept(self, listener: socket.socket, handle: Callable[[socket.socket], None]) -> None:
        """Accept on a listener (bounded batch; paused, not spinning, at the fd limit: accept.py)."""
        self._acceptor.accept(listener, handle)

    def off_loop(self, key: str, work: Callable[[], None], then: Callable[[Exception | None], None]) -> None:
        """Run blocking `work` (e.g. a first SVID fetch) on a worker, once per key however many wait for it;
        each `then(error or None)` runs on the control loop afterwards, so the loop itself never blocks."""
        if key not in self._waiting and len(self._waiting) >= MAX_OFF_LOOP_KEYS:
            # Bounded: a flood of distinct lookups (claimed sources, unknown destinations) must not queue
            # without end; the caller fails closed on the error.
            self.counters["off_loop_overloaded"] += 1
            then(OverloadedError(f"{len(self._waiting)} blocking calls already waiting"))
            return
        waiting = self._waiting.setdefault(key, [])
        waiting.append(then)
        if len(waiting) > 1:
            return

        def run() -> None:
            err: Exception | None = None
            try:
                work()
            except Exception as exc:
                err = exc
            self.loop.call_soon(lambda: self._resume(key, err))

        self.workers.submit(run)

    def lookup_off_loop(self, ip: str, then: Callable[[Exception | None], None]) -> None:
        """Ask the plane who holds `ip` (RelayClient.lookup, blocking) on a worker; the answer lands in
        state(), and `then(error or None)` runs on the loop. Requires `lookup`."""
        lookup = self.lookup
        assert lookup is not None

        def ask() -> None:
            lookup(ip)

        self.off_loop(f"lookup {ip}", ask, then)

    def _resume(self, key: str, err: Exception | None) -> None:
        for then in self._waiting.pop(key, []):
            then(err)

    def audit(self, event: str, key: str, reason: str, **fields: object) -> None:
        """A security refusal: always to the audit log (one JSON line each), to the `ambit.audit` text log
        rate-limited per `key` (a flood of refused peers must not flood the text log)."""
        if self.audit_sink is not None:
            try:
                self.audit_sink(event, reason=reason, **fields)
            except Exception:  # the audit log is not allowed to break the proxy; counted instead
                self.counters["audit_errors"] += 1
        self._audit_text.warning(key, "%s: %s %s", event, reason, fields)

    def authorize(self, attrs: ConnectionAttrs) -> Decision:
        """The policy engine's decision; a failing policy engine denies (fail closed) and is counted."""
        try:
            return self.authorizer.authorize(attrs)
        except Exception as exc:
            self.counters["authorizer_errors"] += 1
            log.exception("authorizer failed: %s -> %s", attrs.source_principal, attrs.destination_workload)
            return Decision(allow=False, policy="", reason=f"authorizer error: {type(exc).__name__}")

    def reusable(self, attrs: ConnectionAttrs, decision: Decision) -> bool:
        """Whether an identical connection gets the identical decision until the policy changes (the
        inbound fast path may then accept it unasked): only when the authorizer says so (`reusable`);
        an authorizer without that method, or one that fails, says no."""
        check = getattr(self.authorizer, "reusable", None)
        if check is None:
            return False
        try:
            return bool(check(attrs, decision))
        except Exception:
            self.counters["authorizer_errors"] += 1
            log.exception("authorizer failed to say whether a decision is reusable")
            return False

    def accepted(self, client: socket.socket, direction: Direction, counter: str) -> ConnectionRecord:
        """The record of a connection a capture listener accepted: its original destination and peer."""
        self.counters[counter] += 1
        client.setblocking(False)
        dst_ip, dst_port = original_destination(client)
        src_ip, src_port = peer_address(client)
        return ConnectionRecord(
            conn_id=0,
            direction=direction,
            source_ip=src_ip,
            source_port=src_port,
            destination_ip=dst_ip,
            destination_port=dst_port,
            security_policy="mutual_tls" if direction is Direction.OUTBOUND else "none",
            start_time=time.time(),
        )

    def refuse(self, client: socket.socket, record: ConnectionRecord, flags: str, error: str) -> None:
        """Close a captured connection before any path exists; counted, reported (and logged) by the table."""
        client.close()
        self.counters[f"{record.direction.value}_refused_{flags}"] += 1
        self.table.reject(record, flags, error)

    def hold(self, budget: Budget, key: str, entry: Entry) -> Entry:
        """`entry` holds one unit of `budget` for `key` until the table finishes it (checked by `over_budget`
        first; the loop is single-threaded, so nothing else takes a unit in between)."""
        budget.take(key)
        before = entry.on_finish  # an entry may hold units of several budgets

        def give_back() -> None:
            budget.give_back(key)
            if before is not None:
                before()

        entry.on_finish = give_back
        return entry

    def over_budget(self, budget: Budget, key: str, client: socket.socket, record: ConnectionRecord) -> bool:
        """When `key` has spent `budget`, refuse this new connection (UO): counted, logged rate-limited."""
        if not budget.full(key):
            return False
        self.warn.warning(budget.name, "%s over its %s budget (%d): refusing its new connection",
                          key, budget.name, budget.limit)  # fmt: skip
        self.refuse(client, record, "UO", f"{key} is over its {budget.name} limit ({budget.limit})")
        return True

    def splice_when_connected(self, client: socket.socket, upstream: socket.socket, entry: Entry) -> None:
        """Hand a plaintext pair to the engine once the upstream connect completes."""

        def done(sock: socket.socket, err: int) -> None:
            if self.table.get(entry.tag) is not entry:  # closed by policy meanwhile
                client.close()
                sock.close()
                return
            if err:
                client.close()
                sock.close()
                self.counters["upstream_connect_errors"] += 1
                self.table.finish(entry.tag, response_flags="UF", error=f"connect: {os.strerror(err)}")
                return
            try:
                entry.engine_conn = self.engine.splice(client.detach(), sock.detach(), entry.tag)
            except EngineError as exc:  # the engine owns (and closed) both fds even on error
                self.table.finish(entry.tag, response_flags="UF", error=str(exc))
                return
            self.table.established(entry)

        self.loop.watch_connect(upstream, done)
