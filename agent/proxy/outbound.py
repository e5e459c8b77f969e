"""Outbound capture (:15001): connections a local pod opened, steered here by the redirect.

The accepted socket's local address is the original destination. A destination workload that is in the
mesh is reached through an HBONE stream on a pooled mTLS connection to its node, presenting the source
workload's SVID; anything else passes through in plaintext from the node's own address.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket

from agent.connections import ConnectionRecord, Direction
from agent.proxy.runtime import MeshView, Runtime
from agent.proxy.sockets import (
    connect_nonblocking,
    format_authority,
)
from agent.proxy.table import Entry, Path
from agent.redirect.marks import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from api.resources.workload import Service, Workload
from api.spiffe import SpiffeId
from native.engine import EngineError

log = logging.getLogger("ambit.proxy")

# A captured connection addressed to the capture ports themselves would loop back into the proxy.
_LOOP_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT})


class Outbound:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def on_readable(self, listener: socket.socket) -> None:
        self.rt.accept(listener, self.handle)

    def handle(self, client: socket.socket) -> None:
        rt = self.rt
        record = rt.accepted(client, Direction.OUTBOUND, "outbound_accepted")
        if rt.over_budget(rt.budgets.outbound_sources, record.source_ip, client, record):
            return
        if record.destination_port in _LOOP_PORTS:
            where = f"{record.destination_ip}:{record.destination_port}"
            rt.refuse(client, record, "NR", f"destination {where} is a capture port (loop)")
            return
        self._route(client, record, looked_up=False)

    def _route(self, client: socket.socket, record: ConnectionRecord, looked_up: bool) -> None:
        rt = self.rt
        src_ip, dst_ip, dst_port = record.source_ip, record.destination_ip, record.destination_port
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
        if dst is None or not dst.enrolled(snap.namespace_of(dst)):
            self._passthrough(client, record)
            return
        src = snap.workload_by_ip(src_ip)
        if src is None or src.node != rt.node:
            # Only a local workload's identity may be presented; without one there is nothing to present.
            rt.refuse(client, record, "NR", f"source {src_ip} is not a workload on node {rt.node}")
            return
        self._hbone(client, record, snap, src, dst)

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
        self, client: socket.socket, record: ConnectionRecord, snap: MeshView, src: Workload, dst: Workload
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
        node_ip = snap.node_address(dst.node)
        if node_ip is None:
            rt.refuse(client, record, "UH", f"node {dst.node} of {dst.uid} has no address")
            return
        if rt.tls.has_client(src_id):
            self._open(client, record, src_id, SpiffeId.node(td, dst.node), node_ip)
            return

        def resume(err: Exception | None) -> None:
            if err is None:
                self._open(client, record, src_id, SpiffeId.node(td, dst.node), node_ip)
            else:
                rt.warn.warning(f"svid {src_id}", "no client certificate for %s: %s", src_id, err)
                rt.refuse(client, record, "UF", f"no certificate for {src_id}: {err}")

        rt.counters["outbound_waited_for_svid"] += 1
        rt.off_loop(str(src_id), lambda: rt.tls.fetch(src_id), resume)

    def _open(
        self, client: socket.socket, record: ConnectionRecord, src_id: SpiffeId, peer: SpiffeId, node_ip: str
    ) -> None:
        """Open the CONNECT stream on a pooled connection to the destination node (or a new one)."""
        rt = self.rt
        node = peer.node_name or ""
        try:
            ctx, generation = rt.tls.client(src_id)
        except Exception as exc:  # no SVID (CA unreachable, not authorized for this identity, ...)
            rt.warn.warning(f"svid {src_id}", "no client certificate for %s: %s", src_id, exc)
            rt.refuse(client, record, "UF", f"no certificate for {src_id}: {exc}")
            return
        key = (str(src_id), node)
        where = f"{node_ip}:{HBONE_PORT}"
        conn = rt.pool.acquire(key, generation, where, str(peer))
        if conn is None:
            try:
                sock = connect_nonblocking((node_ip, HBONE_PORT))
            except OSError as exc:
                rt.refuse(client, record, "UF", f"connect {node_ip}:{HBONE_PORT}: {exc}")
                return
            try:
                conn_id = rt.engine.connect_hbone(sock.detach(), ctx, str(peer))
            except EngineError as exc:
                rt.refuse(client, record, "UF", f"HBONE to {node_ip}: {exc}")
                return
            conn = rt.pool.add(key, conn_id, where, generation, str(peer))
            rt.counters["hbone_connections_opened"] += 1
        entry = rt.table.add(
            self._held(Entry(rt.table.next_tag(), record, Path.HBONE_CLIENT, engine_conn=conn.conn_id))
        )
        authority = format_authority(record.destination_ip, record.destination_port)
        try:
            entry.engine_stream = rt.engine.open_stream(
                conn.conn_id, authority, client.detach(), entry.tag, forwarded=record.source_ip
            )
        except EngineError as exc:  # the engine closed the client fd
            rt.pool.release(conn.conn_id)
            rt.table.finish(entry.tag, response_flags="UF", error=str(exc))
            return
        rt.counters["outbound_hbone_streams"] += 1
