"""Outbound capture (:15001): connections a local pod opened, steered here by the redirect.

The accepted socket's local address is the original destination. A destination workload that is in the
mesh is reached through an HBONE stream on a pooled mTLS connection from the source pod's address to
`<destination pod ip>:15008`, presenting the source workload's SVID and requiring the destination's;
anything else passes through in plaintext from the node's own address.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
from collections.abc import Callable

from agent.connections import ConnectionRecord, Direction
from agent.proxy.fastpath import FastPath, Route
from agent.proxy.runtime import MeshView, Runtime
from agent.proxy.sockets import (
    connect_nonblocking,
    format_authority,
)
from agent.proxy.table import Entry, Path
from agent.proxy.telemetry import baggage, new_traceparent, trace_id
from agent.redirect.marks import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from api.resources.workload import Service, Workload
from api.spiffe import SpiffeId
from native.engine import EngineError

log = logging.getLogger("ambit.proxy")

# A captured connection addressed to the capture ports themselves would loop back into the proxy.
_LOOP_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT})


class Outbound:
    def __init__(self, rt: Runtime, serve_local: Callable[[socket.socket, str, str, int], None]) -> None:
        """`serve_local(sock, local_ip, peer_ip, peer_port)`: the inbound HBONE server (`Inbound.serve`), for
        destinations on this node."""
        self.rt = rt
        self.serve_local = serve_local
        # The engine accepts on 15001 and opens what this installed; the rest comes back through `handle`.
        self.fast = FastPath(rt, self.handle)

    def on_readable(self, listener: socket.socket) -> None:
        self.rt.accept(listener, self.handle)

    def handle(self, client: socket.socket) -> None:
        rt = self.rt
        record = rt.accepted(client, Direction.OUTBOUND, "outbound_accepted")
        budget = rt.budgets.outbound_sources
        if budget.at_limit(record.source_ip):  # part of it may be credits the fast path reserved, unused
            self.fast.reclaim(record.source_ip)
        if rt.over_budget(budget, record.source_ip, client, record):
            return
        if record.destination_port in _LOOP_PORTS:
            where = f"{record.destination_ip}:{record.destination_port}"
            rt.refuse(client, record, "NR", f"destination {where} is a capture port (loop)")
            return
        self._route(client, record, looked_up=False)

    def _route(self, client: socket.socket, record: ConnectionRecord, looked_up: bool) -> None:
        rt = self.rt
        src_ip, dst_ip, dst_port = record.source_ip, record.destination_ip, record.destination_port
        fast_generation = self.fast.generation()  # before the snapshot: an entry must not outlive it
        snap = rt.state()
        dst = snap.workload_by_ip(dst_ip)
        service = snap.service_by_ip(dst_ip) if dst is None else None
        unknown = dst is None and (service is None or not snap.service_endpoints(service))
        if unknown and not looked_up and rt.lookup is not None:
            # Peer workloads reach this node on demand: ask the plane (blocking, so off the loop) before
            # deciding that the destination is outside the mesh.
            self._lookup_then_route(client, record)
            return
        if service is not None:
            picked = self._endpoint(snap, service, dst_port)
            if picked is None:
                rt.refuse(client, record, "NR", f"service {service.uid} has no endpoint for port {dst_port}")
                return
            dst, target_port = picked
            # The record names what is actually reached: the chosen endpoint.
            record = dataclasses.replace(record, destination_ip=dst.ips[0], destination_port=target_port)
            fast_generation = -1  # an endpoint is chosen per connection: never a fast path entry
        if dst is None or not dst.enrolled(snap.namespace_of(dst)):
            self._passthrough(client, record)
            return
        src = snap.workload_by_ip(src_ip)
        if src is None or src.node != rt.node:
            # Only a local workload's identity may be presented; without one there is nothing to present.
            rt.refuse(client, record, "NR", f"source {src_ip} is not a workload on node {rt.node}")
            return
        self._hbone(client, record, snap, src, dst, fast_generation)

    def _lookup_then_route(self, client: socket.socket, record: ConnectionRecord) -> None:
        ip = record.destination_ip

        def resume(err: Exception | None) -> None:
            rt = self.rt
            if err is not None:
                rt.counters["outbound_lookup_errors"] += 1
                if rt.state().in_mesh_range(ip):
                    # Never fail open: a mesh address whose owner we could not learn is refused, not sent
                    # in plaintext (it may well be a pod that requires mTLS).
                    rt.counters["outbound_lookup_refused"] += 1
                    rt.refuse(client, record, "NR", f"lookup of mesh address {ip} failed: {err}")
                    return
                rt.warn.warning("lookup_failed", "lookup of %s failed (%s): outside the mesh ranges", ip, err)
            self._route(client, record, looked_up=True)

        self.rt.counters["outbound_waited_for_lookup"] += 1
        self.rt.lookup_off_loop(ip, resume)

    def _held(self, entry: Entry) -> Entry:
        return self.rt.hold(self.rt.budgets.outbound_sources, entry.record.source_ip, entry)

    def _endpoint(self, snap: MeshView, service: Service, port: int) -> tuple[Workload, int] | None:
        """A random endpoint of `service` (spreads load as kube-proxy does) and the target port for `port`."""
        target = next((p.target_port for p in service.ports if p.port == port), None)
        endpoints = snap.service_endpoints(service)
        if target is None or not endpoints:
            return None
        return random.choice(endpoints), target

    def _passthrough(self, client: socket.socket, record: ConnectionRecord) -> None:
        rt = self.rt
        rt.counters["outbound_passthrough"] += 1
        record = dataclasses.replace(record, direction=Direction.PASSTHROUGH, security_policy="none")
        try:
            upstream = connect_nonblocking((record.destination_ip, record.destination_port))
        except OSError as exc:
            rt.refuse(client, record, "UF", f"connect: {os.strerror(exc.errno or 0)}")
            return
        entry = rt.table.add(self._held(Entry(rt.table.next_tag(), record, Path.SPLICE)))
        rt.splice_when_connected(client, upstream, entry)

    def _hbone(
        self,
        client: socket.socket,
        record: ConnectionRecord,
        snap: MeshView,
        src: Workload,
        dst: Workload,
        fast_generation: int,
    ) -> None:
        rt = self.rt
        td = snap.trust_domain
        src_id, dst_id = src.spiffe_id(td), dst.spiffe_id(td)
        record = dataclasses.replace(
            record,
            source_principal=str(src_id),
            destination_principal=str(dst_id),
            source_workload=src.uid,
            destination_workload=dst.uid,
        )
        context = (baggage(src, rt.cluster), new_traceparent())
        record = dataclasses.replace(record, trace_id=trace_id(context[1]))
        if rt.tls.has_client(src_id):
            self._open(client, record, src_id, dst_id, dst.node == rt.node, context, fast_generation)
            return

        def resume(err: Exception | None) -> None:
            if err is None:
                self._open(client, record, src_id, dst_id, dst.node == rt.node, context, -1)
            else:
                rt.warn.warning(f"svid {src_id}", "no client certificate for %s: %s", src_id, err)
                rt.refuse(client, record, "UF", f"no certificate for {src_id}: {err}")

        rt.counters["outbound_waited_for_svid"] += 1
        rt.off_loop(str(src_id), lambda: rt.tls.fetch(src_id), resume)

    def _open(
        self,
        client: socket.socket,
        record: ConnectionRecord,
        src_id: SpiffeId,
        dst_id: SpiffeId,
        local: bool,
        context: tuple[str, str],
        fast_generation: int,
    ) -> None:
        """Open the CONNECT stream on a pooled connection from the source pod to `<destination pod>:15008`
        (or a new one), requiring the destination workload's identity from the server (as ztunnel), with
        the telemetry `context` (baggage, traceparent) ztunnel sends. Then offer the route to the fast
        path (`fast_generation` -1: not eligible)."""
        rt = self.rt
        try:
            ctx, generation = rt.tls.client(src_id)
        except Exception as exc:  # no SVID (CA unreachable, not authorized for this identity, ...)
            rt.warn.warning(f"svid {src_id}", "no client certificate for %s: %s", src_id, exc)
            rt.refuse(client, record, "UF", f"no certificate for {src_id}: {exc}")
            return
        src_ip, dst_ip = record.source_ip, record.destination_ip
        key = (str(src_id), src_ip, str(dst_id), dst_ip)
        where = format_authority(dst_ip, HBONE_PORT)
        conn = rt.pool.acquire(key, generation, where, str(dst_id))
        if conn is None:
            try:
                sock = self._local_hbone(src_ip, dst_ip) if local else self._dial(src_ip, dst_ip)
            except OSError as exc:
                rt.refuse(client, record, "UF", f"connect {where}: {exc}")
                return
            try:
                conn_id = rt.engine.connect_hbone(sock.detach(), ctx, str(dst_id))
            except EngineError as exc:
                rt.refuse(client, record, "UF", f"HBONE to {where}: {exc}")
                return
            conn = rt.pool.add(key, conn_id, where, generation, str(dst_id))
            rt.counters["hbone_connections_opened"] += 1
        entry = rt.table.add(
            self._held(Entry(rt.table.next_tag(), record, Path.HBONE_CLIENT, engine_conn=conn.conn_id))
        )
        authority = format_authority(dst_ip, record.destination_port)
        try:
            entry.engine_stream = rt.engine.open_stream(
                conn.conn_id, authority, client.detach(), entry.tag, forwarded=src_ip,
                forwarded_port=record.source_port,
                headers=(("baggage", context[0]), ("traceparent", context[1])),
            )  # fmt: skip
        except EngineError as exc:  # the engine closed the client fd
            rt.pool.release(conn.conn_id)
            rt.table.finish(entry.tag, response_flags="UF", error=str(exc))
            return
        rt.counters["outbound_hbone_streams"] += 1
        if fast_generation >= 0:
            route = Route(
                (src_ip, dst_ip, record.destination_port), key, src_id, generation, fast_generation,
                entry.record, authority, context[0],
            )  # fmt: skip
            self.fast.offer(route, conn)

    def _dial(self, src_ip: str, dst_ip: str) -> socket.socket:
        """The outer connection, from the source pod's address (so the destination sees the same source as
        ztunnel would, and sourceIps/ipBlocks mean the same on both sides) to `<dst ip>:15008`. Marked so
        no capture program takes it; its replies reach it through the capture's socket lookup."""
        source = src_ip if self.rt.preserve_source_ip else None
        return connect_nonblocking((dst_ip, HBONE_PORT), source_ip=source)

    def _local_hbone(self, src_ip: str, dst_ip: str) -> socket.socket:
        """A destination on this node: the same HBONE (mTLS, the destination's certificate, inbound
        authorization) over a socket pair, served as if accepted on `<dst ip>:15008` from the source pod.
        A packet to a local pod's address from the agent itself would be routed into the pod, not to
        the HBONE listener."""
        ours, theirs = socket.socketpair()
        self.rt.counters["hbone_local_connections"] += 1
        self.serve_local(theirs, dst_ip, src_ip, 0)
        return ours
