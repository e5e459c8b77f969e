"""Inbound: HBONE streams from peer nodes (:15008) and plaintext connections to local pods (:15006).

HBONE: the engine verifies the client's chain and reports its SPIFFE ID (peer_verified); each CONNECT is
checked here (the authority must name a workload on this node), authorized, and only then connected to the
pod; the stream is accepted (200) once that connect succeeds, refused 503 when it fails, 403 when denied.

The source pod IP comes from the CONNECT's `forwarded: for=<ip>` header, believed only when it matches the
authenticated peer identity (see `_claimed_source` and docs/proxy.md). Without a believable claim it is
recovered from the mesh view: the one workload with the peer's SPIFFE identity on the node whose address
the connection came from; when that is not unique the node's address stands for the source.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from dataclasses import dataclass

from agent.connections import ConnectionRecord, Direction
from agent.policy.decision import ConnectionAttrs
from agent.proxy.fastpath_in import Allowed, InboundFastPath
from agent.proxy.forwarded import Belief, Forwarded, ForwardedError, believe, parse_forwarded
from agent.proxy.runtime import MeshView, Runtime
from agent.proxy.sockets import (
    AuthorityError,
    connect_nonblocking,
    original_destination,
    parse_authority,
    peer_address,
)
from agent.proxy.sources import SourceIndex
from agent.proxy.table import Entry, Path
from agent.proxy.telemetry import TelemetryError, parse_baggage, source_workload, trace_id
from agent.redirect.marks import AGENT_SOCKET_MARK, HBONE_PORT, INBOUND_PLAINTEXT_PORT
from api.resources.workload import Workload
from api.spiffe import SpiffeId, SpiffeIdError
from native.engine import EngineError, Event, refused_certificate

log = logging.getLogger("ambit.proxy")

STATUS_BAD_REQUEST = 400
STATUS_FORBIDDEN = 403
STATUS_NOT_FOUND = 404
STATUS_UNAVAILABLE = 503


@dataclass
class ServerConn:
    """One HBONE connection a peer opened to a local workload's address (`local_ip`:15008)."""

    local_ip: str
    peer_ip: str
    peer_port: int
    # The workload identity streams are authorized as (an alias domain's mapped onto this mesh's); None
    # until the engine verified the peer, and for good when the peer is refused (`refused` says why).
    principal: SpiffeId | None = None
    presented: str = ""  # the SPIFFE ID in the client certificate, as presented
    refused: str = ""
    identity_held: str = ""  # the identity whose connection budget this connection holds a unit of
    tls_version: str = ""
    tls_cipher: str = ""
    peer_cert_sha256: str = ""


class Inbound:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.server_conns: dict[int, ServerConn] = {}
        self._sources = SourceIndex()
        self.fast = InboundFastPath(rt)  # streams identical to ones allowed here, accepted by the engine

    # --- HBONE (15008) ---------------------------------------------------------------------------

    def on_hbone_readable(self, listener: socket.socket) -> None:
        self.rt.accept(listener, self._accept)

    def _accept(self, sock: socket.socket) -> None:
        """A peer dialled `<local pod ip>:15008` (steered here by the capture): serve it as that pod."""
        local_ip, _ = original_destination(sock)
        peer_ip, peer_port = peer_address(sock)
        self.serve(sock, local_ip, peer_ip, peer_port)

    def serve(self, sock: socket.socket, local_ip: str, peer_ip: str, peer_port: int) -> None:
        """Serve HBONE on `sock`, presenting the SVID of the local workload that owns `local_ip` (the
        address the peer dialled: ztunnel sends no SNI, so the address is all there is to choose by).
        An address that is no local workload has no identity to present: the connection is closed."""
        rt = self.rt
        rt.counters["hbone_accepted"] += 1
        # Pending handshakes and connections per source are the engine's to bound once it holds the socket
        # (limits.py); until then (a first SVID may be fetched meanwhile) this budget holds the socket.
        waiting = rt.budgets.hbone_waiting
        if not waiting.take(peer_ip):
            # Unauthenticated: closed before any TLS state exists (no handshake memory to spend).
            rt.warn.warning(waiting.name, "HBONE from %s over its %s budget (%d): closed", peer_ip,
                            waiting.name, waiting.limit)  # fmt: skip
            sock.close()
            return
        sock.setblocking(False)
        snap = rt.state()
        rt.follow_trust(snap)  # the engine judges this handshake by the config it is served under
        local = snap.workload_by_ip(local_ip)
        if local is None or local.node != rt.node:
            rt.counters["hbone_not_a_local_workload"] += 1
            rt.warn.warning("hbone_not_local", "refusing HBONE from %s to %s: not a workload on node %s",
                            peer_ip, local_ip, rt.node)  # fmt: skip
            self._abandon(sock, peer_ip)
            return
        identity = local.spiffe_id(snap.trust_domain)
        if rt.tls.has_server(identity):
            self._serve_as(sock, identity, local_ip, peer_ip, peer_port)
            return

        def resume(err: Exception | None) -> None:
            if err is None:
                self._serve_as(sock, identity, local_ip, peer_ip, peer_port)
                return
            rt.counters["hbone_no_identity"] += 1
            rt.warn.warning("hbone_no_identity", "refusing HBONE from %s to %s: no certificate for %s: %s",
                            peer_ip, local_ip, identity, err)  # fmt: skip
            self._abandon(sock, peer_ip)

        rt.counters["hbone_waited_for_svid"] += 1
        rt.off_loop(str(identity), lambda: rt.tls.fetch(identity), resume)

    def _abandon(self, sock: socket.socket | None, peer_ip: str) -> None:
        """Close an accepted connection before it became a served one, and give back its budget unit."""
        if sock is not None:
            sock.close()
        self.rt.budgets.hbone_waiting.give_back(peer_ip)

    def _serve_as(
        self, sock: socket.socket, identity: SpiffeId, local_ip: str, peer_ip: str, peer_port: int
    ) -> None:
        rt = self.rt
        try:
            ctx = rt.tls.server(identity)
        except Exception as exc:  # no SVID (CA unreachable, ...): nothing to present
            rt.counters["hbone_no_identity"] += 1
            rt.warn.warning("hbone_no_identity", "refusing HBONE from %s: no certificate for %s: %s", peer_ip,
                            identity, exc)  # fmt: skip
            self._abandon(sock, peer_ip)
            return
        try:
            conn_id = rt.engine.serve_hbone(sock.detach(), ctx)
        except EngineError as exc:  # the engine owns (and closed) the fd
            rt.counters["hbone_serve_errors"] += 1
            rt.warn.warning("hbone_serve_errors", "HBONE from %s: %s", peer_ip, exc)
            return
        finally:
            rt.budgets.hbone_waiting.give_back(peer_ip)  # the engine's caps hold it from here
        self.server_conns[conn_id] = ServerConn(local_ip, peer_ip, peer_port)

    def on_peer_verified(self, ev: Event) -> None:
        """Only a workload identity of this mesh's trust domain (or an alias) may open streams on 15008:
        anything else (another domain signed by the same root, a node's or the plane's identity, a
        non-SPIFFE name) is refused before any stream is served: counted, audited, connection closed."""
        conn = self.server_conns.get(ev.conn_id)
        if conn is None:
            return
        conn.tls_version, conn.tls_cipher = ev.tls_version, ev.tls_cipher
        conn.peer_cert_sha256, conn.presented = ev.peer_cert_sha256, ev.peer_id
        try:
            presented = SpiffeId.parse(ev.peer_id)
        except SpiffeIdError:
            self._refuse_peer(
                ev.conn_id, conn, "hbone_bad_peer_id", f"non-SPIFFE identity {ev.peer_id[:128]!r}"
            )
            return
        trust = self.rt.state().trust
        principal = trust.workload(presented)
        if principal is not None:
            identities = self.rt.budgets.hbone_identities
            if identities.full(str(principal)):
                why = f"{principal} holds {identities.limit} connections ({identities.name})"
                self._refuse_peer(ev.conn_id, conn, f"limit_{identities.name}", why)
                return
            identities.take(str(principal))
            conn.principal, conn.identity_held = principal, str(principal)
            return
        if not trust.accepts(presented):
            why = f"trust domain {presented.trust_domain!r} is not this mesh's ({trust.local})"
            self._refuse_peer(ev.conn_id, conn, "hbone_foreign_trust_domain", f"{presented}: {why}")
        else:
            self._refuse_peer(
                ev.conn_id, conn, "hbone_not_workload", f"{presented} is not a workload identity"
            )

    def on_conn_error(self, ev: Event) -> None:
        """A served connection failed: when the handshake refused the client's certificate (the engine's
        verdict, sent as a TLS alert: untrusted, CA:true, not a workload identity of an accepted domain),
        that is an identity refusal like those at peer_verified: counted and audited."""
        conn = self.server_conns.get(ev.conn_id)
        if conn is not None:
            self.fast.forget_conn(ev.conn_id)  # its streams end next: no more accepted unasked
        if conn is None or conn.refused or not refused_certificate(ev):
            return
        conn.presented = ev.peer_id
        self._audit_refusal(conn, "hbone_bad_certificate", ev.detail)

    def _audit_refusal(self, conn: ServerConn, counter: str, why: str) -> None:
        rt = self.rt
        conn.refused = why
        rt.counters[counter] += 1
        rt.counters["hbone_peer_refused"] += 1
        rt.audit("hbone_peer_refused", counter, why, peer_ip=conn.peer_ip, peer_id=conn.presented,
                 peer_cert_sha256=conn.peer_cert_sha256)  # fmt: skip

    def _refuse_peer(self, conn_id: int, conn: ServerConn, counter: str, why: str) -> None:
        rt = self.rt
        self._audit_refusal(conn, counter, why)
        try:
            rt.engine.close(conn_id)  # GOAWAY: streams already sent are refused below, none is served
        except EngineError as exc:  # already gone
            log.debug("closing refused HBONE connection %d: %s", conn_id, exc)

    def on_conn_gone(self, conn_id: int) -> bool:
        conn = self.server_conns.pop(conn_id, None)
        if conn is None:
            return False
        self.fast.forget_conn(conn_id)
        if conn.identity_held:
            self.rt.budgets.hbone_identities.give_back(conn.identity_held)
        return True

    def on_stream_request(self, ev: Event, looked_up: bool = False) -> None:
        rt = self.rt
        generation = self.fast.generation()  # before anything the decision reads (fastpath_in.py)
        conn = self.server_conns.get(ev.conn_id)
        if conn is None:
            self._refuse_stream(ev, STATUS_FORBIDDEN, "stream on an unknown connection")
            return
        if conn.principal is None:  # before anything else: a refused peer learns nothing about this node
            why = conn.refused or "not verified yet"
            self._refuse_stream(ev, STATUS_FORBIDDEN, f"peer {conn.peer_ip} refused: {why}")
            return
        try:
            dst_ip, dst_port = parse_authority(ev.authority)
        except AuthorityError as exc:
            self._refuse_stream(ev, STATUS_BAD_REQUEST, str(exc))
            return
        if dst_ip != conn.local_ip:
            # As ztunnel: the connection was dialled to the destination pod itself; a CONNECT naming
            # another address would borrow this pod's identity (its certificate) for someone else's.
            why = f"authority {dst_ip} is not the address this connection was dialled to ({conn.local_ip})"
            self._refuse_stream(ev, STATUS_BAD_REQUEST, why)
            return
        snap = rt.state()
        dst = snap.workload_by_ip(dst_ip)
        if dst is None or dst.node != rt.node:
            self._refuse_stream(ev, STATUS_NOT_FOUND, f"{dst_ip} is not a workload on node {rt.node}")
            return
        claim = self._parse_claim(ev, conn)
        claim_ip = claim.ip if claim is not None else None
        unknown = [ip for ip in dict.fromkeys((conn.peer_ip, claim_ip)) if ip and self._unknown(snap, ip)]
        if unknown and not looked_up and rt.lookup is not None:
            # A claim (the TCP peer address, `forwarded`) can only be believed for a workload we know:
            # learn who holds the addresses first.
            self._lookup_claims(ev, unknown)
            return
        claimed = self._peer_source(snap, conn) or self._believed_source(claim_ip, snap, conn)
        if claimed is not None:
            src_ip, src = claimed
        else:
            src = self._sources.lookup(snap, conn.principal, conn.peer_ip)
            src_ip = src.ips[0] if src is not None else conn.peer_ip
        attrs = ConnectionAttrs(conn.principal, src_ip, dst_ip, dst_port, dst.uid, dst.namespace, tls=True)
        decision = rt.authorize(attrs)
        tag = rt.table.next_tag()
        # Built once, complete (the decision's policy, the table's tag): no replace per stream.
        record = ConnectionRecord(
            conn_id=tag,
            direction=Direction.INBOUND,
            source_ip=src_ip,
            source_port=_source_port(src_ip, claim if claimed is not None else None, conn),
            destination_ip=dst_ip,
            destination_port=dst_port,
            source_principal=conn.presented or str(conn.principal),
            destination_principal=str(dst.spiffe_id(snap.trust_domain)),
            source_workload=src.uid if src is not None else self._baggage_source(ev, conn),
            destination_workload=dst.uid,
            tls_version=conn.tls_version,
            tls_cipher=conn.tls_cipher,
            peer_cert_sha256=conn.peer_cert_sha256,
            start_time=time.time(),
            trace_id=self._trace_id(ev, conn),
            policy=decision.policy,
        )
        if not decision.allow:
            rt.counters["inbound_denied"] += 1
            self._reject(ev, STATUS_FORBIDDEN)
            rt.table.reject(record, "DENY", decision.reason)
            return
        # One peer node with all its identities must not hold this node's streams (an fd and buffers each)
        # to the others' cost (one identity's streams: the engine's streams_per_peer, limits.py).
        held = ((rt.budgets.hbone_source_streams, conn.peer_ip),)
        for budget, key in held:
            if budget.at_limit(key):  # part of it may be credits the fast path reserved, unused
                self.fast.reclaim(key)
            if budget.full(key):
                rt.warn.warning(
                    budget.name, "%s holds %d streams (limit): refusing its new ones", key, budget.limit
                )
                self._reject(ev, STATUS_UNAVAILABLE)
                rt.table.reject(record, "UO", f"{key} is over its {budget.name} limit ({budget.limit})")
                return
        spoof = src_ip if ((claimed is not None or src is not None) and rt.preserve_source_ip) else None
        entry = Entry(tag, record, Path.HBONE_SERVER, attrs, ev.conn_id, ev.stream_id)
        try:
            # The engine connects to the pod and answers 200 once connected (stream_accepted), or 503
            # (upstream_failed): no socket or connect watch in this loop.
            rt.engine.accept_connect(
                ev.conn_id, ev.stream_id, (dst_ip, dst_port), spoof, AGENT_SOCKET_MARK, entry.tag
            )
        except EngineError as exc:  # the socket could not be made (bind of the client's address, ...)
            self._reject(ev, STATUS_UNAVAILABLE)
            rt.table.reject(record, "UF", f"connect: {exc}")
            return
        for budget, key in held:
            rt.hold(budget, key, entry)
        rt.table.add(entry)
        if self.fast.enabled and src is not None and (claim is not None or not ev.forwarded):
            # Known source (the record needs no baggage), no malformed claim: identical streams may be
            # accepted by the engine from now on, when the decision allows that (fastpath_in.offer).
            self.fast.offer(Allowed(
                generation, snap, ev.conn_id, ev.authority, claim.ip if claim is not None else "", attrs,
                decision, record, (dst_ip, dst_port), spoof, AGENT_SOCKET_MARK, conn.peer_ip, conn.peer_port,
                port_from_claim=claimed is not None and claim is not None and claim.ip == src_ip,
                local=dst.spiffe_id(snap.trust_domain),
            ))  # fmt: skip

    def _peer_source(self, snap: MeshView, conn: ServerConn) -> tuple[str, Workload | None] | None:
        """(source IP, its workload when known) from the HBONE connection's TCP peer address, which is the
        source pod's own when the peer originates from it (as ztunnel and ambit do). The address is a claim
        like `forwarded` (a node can bind any address), so it gets the same trust decision
        (`forwarded.believe`: a workload of exactly the peer's identity); a node's address (an older
        ambit dialling from its node) is no pod's and falls through to `forwarded`."""
        principal = conn.principal
        if principal is None:
            return None
        belief, known = believe(conn.peer_ip, principal, snap)
        if belief is Belief.NODE_ADDRESS:  # an older peer dialling from its node: no pod address
            return None
        if belief is not Belief.BELIEVED:
            rt = self.rt
            rt.counters["hbone_peer_address_rejected"] += 1
            rt.counters[f"hbone_peer_address_rejected_{belief.value}"] += 1
            rt.warn.warning("hbone_peer_address", "HBONE peer %s (%s) is no address of its identity (%s): "
                            "not believed as the source", conn.peer_ip, principal, belief.value)  # fmt: skip
            return None
        self.rt.counters["hbone_peer_address_used"] += 1
        return conn.peer_ip, known

    def _parse_claim(self, ev: Event, conn: ServerConn) -> Forwarded | None:
        """What the stream's `forwarded` header claims (None when absent or malformed, counted)."""
        try:
            return parse_forwarded(ev.forwarded)
        except ForwardedError as exc:
            self.rt.counters["hbone_forwarded_invalid"] += 1
            self.rt.warn.warning("forwarded_invalid", "HBONE stream from %s: ignoring forwarded header: %s",
                                 conn.peer_ip, exc)  # fmt: skip
            return None

    @staticmethod
    def _unknown(snap: MeshView, ip: str) -> bool:
        return snap.workload_by_ip(ip) is None and not snap.is_node_address(ip)

    def _lookup_claims(self, ev: Event, ips: list[str]) -> None:
        rt = self.rt
        ip, rest = ips[0], ips[1:]
        rt.counters["hbone_forwarded_lookups"] += 1

        def resume(err: Exception | None) -> None:
            if err is None:
                if rest:
                    self._lookup_claims(ev, rest)
                else:
                    self.on_stream_request(ev, looked_up=True)
                return
            # Fail closed: without knowing who holds the claimed address the stream's source is unknown,
            # and an ipBlocks DENY could be dodged by falling back to another address.
            rt.counters["hbone_forwarded_lookup_failed"] += 1
            self._refuse_stream(ev, STATUS_UNAVAILABLE, f"cannot check claimed source {ip}: {err}")

        rt.lookup_off_loop(ip, resume)

    def _believed_source(
        self, ip: str | None, snap: MeshView, conn: ServerConn
    ) -> tuple[str, Workload | None] | None:
        """(source IP, its workload) when the claim is believed (`forwarded.believe`: the address of a
        workload of exactly the peer's identity), else None (counted by why)."""
        principal = conn.principal
        if ip is None or principal is None:
            return None
        belief, known = believe(ip, principal, snap)
        if belief is not Belief.BELIEVED:
            rt = self.rt
            rt.counters["hbone_forwarded_rejected"] += 1
            rt.counters[f"hbone_forwarded_rejected_{belief.value}"] += 1
            rt.warn.warning("forwarded_rejected", "HBONE peer %s (%s) claimed source %s (%s): ignored",
                            conn.peer_ip, principal, ip, belief.value)  # fmt: skip
            return None
        self.rt.counters["hbone_forwarded_used"] += 1
        return ip, known

    def _baggage_source(self, ev: Event, conn: ServerConn) -> str:
        """The source workload the peer's baggage names (as ztunnel sends it), for a source the mesh view
        does not know; only within the namespace of the peer's identity (telemetry.source_workload)."""
        rt = self.rt
        if not ev.baggage or conn.principal is None:
            return ""
        try:
            fields = parse_baggage(ev.baggage)
        except TelemetryError as exc:
            rt.counters["hbone_baggage_invalid"] += 1
            rt.warn.warning(
                "baggage_invalid", "HBONE stream from %s: ignoring baggage: %s", conn.peer_ip, exc
            )
            return ""
        uid = source_workload(fields, conn.principal)
        rt.counters["hbone_baggage_used" if uid else "hbone_baggage_ignored"] += 1
        return uid

    def _trace_id(self, ev: Event, conn: ServerConn) -> str:
        found = trace_id(ev.traceparent)
        if ev.traceparent and not found:
            self.rt.counters["hbone_traceparent_invalid"] += 1
            self.rt.warn.warning("traceparent_invalid", "HBONE stream from %s: ignoring traceparent %r",
                                 conn.peer_ip, ev.traceparent[:64])  # fmt: skip
        return found

    def on_stream_accepted(self, ev: Event) -> None:
        """The engine's connect to the pod succeeded and the stream was answered 200."""
        entry = self.rt.table.get(ev.tag)
        if entry is None:  # closed (policy re-check, connection gone) meanwhile
            return
        self.rt.counters["inbound_hbone_streams"] += 1
        self.rt.table.established(entry)

    def on_upstream_failed(self, ev: Event) -> None:
        """The engine's connect to the pod failed: the stream is refused 503 (the engine sends it)."""
        rt = self.rt
        if rt.table.get(ev.tag) is None:
            return
        rt.counters["upstream_connect_errors"] += 1
        rt.table.finish(ev.tag, response_flags="UF", error=ev.detail)

    def _refuse_stream(self, ev: Event, status: int, why: str) -> None:
        self.rt.counters[f"inbound_refused_{status}"] += 1
        what, key = ev.authority[:128], f"refused_{status}"
        self.rt.warn.log(logging.INFO, key, "HBONE stream %r refused (%d): %s", what, status, why)
        self._reject(ev, status)

    def _reject(self, ev: Event, status: int) -> None:
        self._reject_ids(ev.conn_id, ev.stream_id, status)

    def _reject_ids(self, conn_id: int, stream_id: int, status: int) -> None:
        try:
            self.rt.engine.reject_stream(conn_id, stream_id, status)
        except EngineError as exc:  # the connection went away in the meantime
            log.debug("reject_stream(%d, %d): %s", conn_id, stream_id, exc)

    # --- plaintext (15006) -----------------------------------------------------------------------

    def on_plaintext_readable(self, listener: socket.socket) -> None:
        self.rt.accept(listener, self._plaintext)

    def _plaintext(self, client: socket.socket) -> None:
        rt = self.rt
        record = rt.accepted(client, Direction.INBOUND, "plaintext_accepted")
        if rt.over_budget(rt.budgets.plaintext_sources, record.source_ip, client, record):
            return
        src_ip, dst_ip, dst_port = record.source_ip, record.destination_ip, record.destination_port
        snap = rt.state()
        dst = snap.workload_by_ip(dst_ip)
        if dst is not None:
            record = dataclasses.replace(
                record,
                destination_workload=dst.uid,
                destination_principal=str(dst.spiffe_id(snap.trust_domain)),
            )
        if dst is None or dst.node != rt.node or dst_port == INBOUND_PLAINTEXT_PORT:
            rt.refuse(client, record, "NR", f"{dst_ip}:{dst_port} is not a workload on node {rt.node}")
            return
        if dst_port == HBONE_PORT:
            # HBONE addressed to the pod itself (how ztunnel dials): mTLS the plaintext path must never
            # splice in clear past the policy. Refused until it is steered to the HBONE listener.
            rt.counters["plaintext_refused_hbone"] += 1
            rt.refuse(
                client, record, "NR", f"HBONE to {dst.uid} on {dst_ip}:{dst_port} is not relayed as plaintext"
            )
            return
        if rt.authorizer.mtls_mode(dst, dst_port) == "STRICT":
            rt.refuse(client, record, "DENY", f"{dst.uid} requires mTLS (STRICT)")
            return
        attrs = ConnectionAttrs(None, src_ip, dst_ip, dst_port, dst.uid, dst.namespace, tls=False)
        decision = rt.authorize(attrs)
        record = dataclasses.replace(record, policy=decision.policy)
        if not decision.allow:
            rt.refuse(client, record, "DENY", decision.reason)
            return
        spoof = src_ip if rt.preserve_source_ip else None
        try:
            upstream = connect_nonblocking((dst_ip, dst_port), source_ip=spoof)
        except OSError as exc:
            rt.refuse(client, record, "UF", f"connect: {exc}")
            return
        entry = Entry(rt.table.next_tag(), record, Path.SPLICE, attrs)
        rt.table.add(rt.hold(rt.budgets.plaintext_sources, record.source_ip, entry))
        rt.splice_when_connected(client, upstream, entry)


def _source_port(src_ip: str, believed: Forwarded | None, conn: ServerConn) -> int:
    """The client's source port: the one the peer's `forwarded` claim names with the source address
    (`for="ip:port"`, as ztunnel and ambit send it) once that source is believed; else, when the source is
    the HBONE connection's own peer, that connection's port (what ztunnel reports); else unknown (0)."""
    if believed is not None and believed.ip == src_ip and believed.port:
        return believed.port
    return conn.peer_port if src_ip == conn.peer_ip else 0
