"""The relay's gRPC service: node-scoped delta subscriptions with ACK/NACK, and on-demand address lookup.

Per stream the plane remembers what the node ACKed (key -> content hash). Each response is the difference
between that and the node's current view (mgmt/scope.py), for the types it subscribed to only, and moves it
to the store's version in one step. One response is in flight at a time: the next is computed after the
ACK/NACK, so a NACKed update is never stacked on. A reconnecting node states what it holds
(`initial_resource_versions`), so it gets only what changed, even from a restarted plane.

Identity: the node name comes from the client certificate's SPIFFE ID (spiffe://<td>/node/<name>); asking
as another node, or without a node identity, is refused with PERMISSION_DENIED and audited. An edge gateway
subscribes with its SVID (spiffe://<td>/ns/<ns>/sa/<sa>) for one Gateway that identity serves
(`Subscribe.gateway`) and gets that Gateway's view only (mgmt/gateway_scope.py); references it may not follow
(another namespace's Secret) are left out, counted and audited. Gateways do not Lookup.
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from api import relay_pb2, relay_pb2_grpc
from api.resources import ResourceKey
from api.spiffe import SpiffeId
from mgmt.gateway_scope import GatewayIndex, ReferenceRefusal, stream_name
from mgmt.identity_service import Audit, peer_spiffe_id
from mgmt.scope import LIST_ALL, ScopeIndex, View, filter_types, key_type
from mgmt.store import ConfigSnapshot, ConfigStore, StoredResource

log = logging.getLogger("ambit.mgmt.relay")
audit_log = logging.getLogger("ambit.audit")


class RefusedError(Exception):
    """A request outside the caller's scope (already audited)."""


@dataclass(frozen=True)
class NackRecord:
    node: str
    version: int
    nonce: str
    error: str
    at: float


@dataclass
class _Pending:
    nonce: str
    version: int
    state: dict[str, str]  # key -> hash the node holds once it ACKs


@dataclass(eq=False)  # identity semantics: streams live in a set
class _Stream:
    node: str
    types: frozenset[str]
    acked: dict[str, str]
    acked_version: int
    inbox: queue.Queue[Any] = field(default_factory=queue.Queue)
    pending: _Pending | None = None
    nacked_version: int = -1
    greeted: bool = False  # the first response is sent even when empty: it tells the node it is current
    gateway: str = ""  # an edge gateway's stream: the Gateway (namespace/name) it serves
    identity: SpiffeId | None = None  # the gateway's certificate identity (re-checked on every version)
    refusals_reported: int = -1  # the version whose refused references were last audited


_WAKE = object()
_CLOSED = object()
# A missed lookup is watched this long (over the agents' 5 s negative cache), at most this many per node.
MISS_WATCH_S = 30.0
MAX_MISSES_PER_NODE = 1024


class RelayService(relay_pb2_grpc.RelayServicer):
    def __init__(self, store: ConfigStore, trust_domain: str, audit: Audit | None = None) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self.audit = audit  # the plane's audit log (JSON lines); "ambit.audit" logging always gets a copy
        self._lock = threading.Lock()
        self._index = ScopeIndex(store.current)
        self._gateways = GatewayIndex(store.current, trust_domain)
        self._streams: set[_Stream] = set()  # guarded by _lock
        self._peers: dict[str, set[str]] = {}  # node -> peer workload keys it looked up
        # node -> address -> monotonic deadline: lookups that found nothing. A workload that appears at
        # that address later joins the node's subscription, so the node (which caches the miss) learns it
        # by push rather than after its negative cache expires: a new pod speaks HBONE from its first SYN.
        self._misses: dict[str, dict[str, float]] = {}
        self._acked: dict[str, int] = {}  # node -> last ACKed version
        self._nacks: dict[str, NackRecord] = {}  # node -> last NACK
        self._node_replies: dict[str, dict[str, int]] = {}  # node -> {"acks": n, "nacks": n}, for metrics
        self._nonce = itertools.count(1)
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "streams",
                "resumed_streams",
                "responses",
                "full_responses",
                "resources_sent",
                "removals_sent",
                "acks",
                "nacks",
                "stale_acks",
                "refused",
                "lookups",
                "listings",
                "gateway_streams",
                "references_refused",
            ),
            0,
        )
        store.add_listener(self._on_config)

    def close(self) -> None:
        self.store.remove_listener(self._on_config)

    # -- observability ---------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def last_nack(self, node: str) -> NackRecord | None:
        with self._lock:
            return self._nacks.get(node)

    def acked_version(self, node: str) -> int:
        with self._lock:
            return self._acked.get(node, 0)

    def rows(self) -> list[dict[str, Any]]:
        """Per node, what it holds (like `istioctl proxy-status`): the version it ACKed, the last one it
        NACKed and why, and a state against the plane's current version:

        SYNCED (ACKed the current version), NACKED (rejected a version newer than what it ACKed: it runs
        older config), STALE (connected, not yet at the current version), DISCONNECTED."""
        current = self.store.version
        with self._lock:
            nodes = sorted({s.node for s in self._streams} | set(self._acked) | set(self._nacks))
            connected = {s.node for s in self._streams}
            rows = []
            for n in nodes:
                acked = self._acked.get(n, 0)
                nack = self._nacks.get(n)
                if nack is not None and nack.version > acked:
                    state = "NACKED"
                elif n not in connected:
                    state = "DISCONNECTED"
                else:
                    state = "SYNCED" if acked == current else "STALE"
                rows.append(
                    {
                        "node": n,
                        "state": state,
                        "connected": n in connected,
                        "acked_version": acked,
                        "nacked_version": nack.version if nack else 0,
                        "last_nack": nack.error if nack else "",
                        "peers": len(self._peers.get(n, ())),
                        "acks": self._node_replies.get(n, {}).get("acks", 0),
                        "nacks": self._node_replies.get(n, {}).get("nacks", 0),
                    }
                )
            return rows

    def _count_reply(self, node: str, which: str) -> None:
        # _lock held. One entry per node that ever answered (authenticated nodes only, as _acked).
        replies = self._node_replies.setdefault(node, {"acks": 0, "nacks": 0})
        replies[which] += 1

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    # -- config changes --------------------------------------------------------------------------------
    def _on_config(self, snapshot: ConfigSnapshot) -> None:
        index = ScopeIndex(snapshot)
        gateways = GatewayIndex(snapshot, self.trust_domain)
        with self._lock:
            self._index = index
            self._gateways = gateways
            self._resolve_misses(index)
            streams = list(self._streams)
        for s in streams:
            s.inbox.put(_WAKE)

    def _resolve_misses(self, index: ScopeIndex) -> None:
        """Under the lock: addresses nodes missed that the new version has, become their peers."""
        now = time.monotonic()
        for node, misses in list(self._misses.items()):
            local = index.local_keys(node)
            for address, until in list(misses.items()):
                keys = [k for k in index.lookup(address) if k not in local] if until > now else []
                if until <= now or keys:
                    del misses[address]
                if keys:
                    self._peers.setdefault(node, set()).update(keys)
            if not misses:
                del self._misses[node]

    def _remember_miss(self, node: str, address: str) -> None:
        with self._lock:
            misses = self._misses.setdefault(node, {})
            if len(misses) >= MAX_MISSES_PER_NODE and address not in misses:
                del misses[min(misses, key=misses.__getitem__)]  # the oldest goes first
            misses[address] = time.monotonic() + MISS_WATCH_S

    # -- identity --------------------------------------------------------------------------------------
    def _peer_node(self, context: grpc.ServicerContext, method: str) -> str:
        sid = peer_spiffe_id(context)
        if sid is None:
            reason = "no client certificate with an end-entity SPIFFE ID"
        elif sid.trust_domain != self.trust_domain or not sid.node_name:
            reason = f"{sid} is not a node identity of {self.trust_domain}"
        elif not self._node_in_config(sid.node_name):
            # A valid certificate of a node that was removed (or never added): it gets nothing, not even
            # the cluster-wide part of a view.
            reason = f"node {sid.node_name!r} is not in the config"
        else:
            return sid.node_name
        self._refuse(context, method, (sid.node_name or "") if sid else "", "", reason)
        raise AssertionError("unreachable")  # _refuse aborts the RPC

    def _node_in_config(self, node: str) -> bool:
        with self._lock:
            index = self._index
        return str(ResourceKey("Node", "", node)) in index.snapshot.resources

    def _refuse(self, context: grpc.ServicerContext, method: str, node: str, asked: str, reason: str) -> None:
        self._count("refused")
        fields = {
            "method": method,
            "node": node,
            "requested_node": asked,
            "peer": context.peer(),
            "reason": reason,
        }
        audit_log.warning("relay request refused: %s", reason, extra={"event": "relay_refused", **fields})
        if self.audit is not None:
            self.audit.record("relay_refused", **fields)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)

    def _gateway_caller(self, context: grpc.ServicerContext) -> SpiffeId | None:
        """The caller's identity when it is a workload identity of our trust domain (an edge gateway's)."""
        sid = peer_spiffe_id(context)
        if sid is None or sid.trust_domain != self.trust_domain or sid.node_name or not sid.namespace:
            return None
        return sid

    def _check_gateway(self, context: grpc.ServicerContext, sid: SpiffeId, sub: relay_pb2.Subscribe) -> str:
        """The Gateway `sub` asks for, if `sid` serves it; otherwise the request is refused."""
        with self._lock:
            served = self._gateways.served_by(sid)
        if sub.node:
            reason = f"{sid} is a gateway identity: it may not subscribe as node {sub.node!r}"
        elif not sub.gateway:
            reason = f"{sid} is no node identity; a gateway names the Gateway it serves"
        elif sub.gateway not in served:
            reason = (
                f"{sid} does not serve Gateway {sub.gateway!r} (it serves: {', '.join(served) or 'none'})"
            )
        else:
            return sub.gateway
        self._refuse(context, "Subscribe", str(sid), sub.gateway or sub.node, reason)
        raise AssertionError("unreachable")

    def _still_serves(self, stream: _Stream) -> bool:
        with self._lock:
            return self._gateways.spiffe_id(stream.gateway) == stream.identity

    def _check_node(self, context: grpc.ServicerContext, method: str, cert_node: str, asked: str) -> None:
        if asked and asked != cert_node:
            self._refuse(
                context, method, cert_node, asked, f"node {cert_node!r} may not ask as node {asked!r}"
            )

    # -- Subscribe -------------------------------------------------------------------------------------
    def Subscribe(
        self, request_iterator: Iterator[relay_pb2.SubscribeRequest], context: grpc.ServicerContext
    ) -> Iterator[relay_pb2.SubscribeResponse]:
        gateway_id = self._gateway_caller(context)
        node = "" if gateway_id is not None else self._peer_node(context, "Subscribe")
        first = next(request_iterator, None)
        if first is None:
            return
        if first.WhichOneof("request") != "subscribe":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request must be a subscribe")
        if gateway_id is not None:
            gateway = self._check_gateway(context, gateway_id, first.subscribe)
            stream = self._open(stream_name(gateway), first.subscribe, gateway, gateway_id)
        else:
            self._check_node(context, "Subscribe", node, first.subscribe.node)
            stream = self._open(node, first.subscribe)
        context.add_callback(lambda: stream.inbox.put(_CLOSED))
        reader = threading.Thread(
            target=self._read, args=(request_iterator, stream), name=f"relay-read-{node}", daemon=True
        )
        reader.start()
        try:
            yield from self._serve(stream, context)
        finally:
            with self._lock:
                self._streams.discard(stream)

    def _open(
        self, node: str, sub: relay_pb2.Subscribe, gateway: str = "", identity: SpiffeId | None = None
    ) -> _Stream:
        acked = {k: h for rv in sub.initial_resource_versions.values() for k, h in rv.versions.items()}
        stream = _Stream(
            node, frozenset(sub.types), acked, sub.resume_version, gateway=gateway, identity=identity
        )
        with self._lock:
            index = self._index
            if not gateway:
                # Peers the node held before (from a previous stream, maybe a previous plane) stay in scope:
                # the same as looking their addresses up again.
                local = index.local_keys(node)
                held = {
                    k for k in acked if key_type(k) == "Workload" and k not in local and index.is_workload(k)
                }
                self._peers.setdefault(node, set()).update(held)
            self._streams.add(stream)
            self._counters["gateway_streams" if gateway else "streams"] += 1
            if acked or sub.resume_version:
                self._counters["resumed_streams"] += 1
        log.info(
            "node %s subscribed to %s (resume from version %d)",
            node,
            sorted(stream.types),
            stream.acked_version,
        )
        return stream

    def _read(self, requests: Iterator[relay_pb2.SubscribeRequest], stream: _Stream) -> None:
        try:
            for req in requests:
                stream.inbox.put(req)
        except grpc.RpcError:
            pass
        except Exception:
            log.exception("reading the stream of node %s failed", stream.node)
        stream.inbox.put(_CLOSED)

    def _serve(self, stream: _Stream, context: grpc.ServicerContext) -> Iterator[relay_pb2.SubscribeResponse]:
        while context.is_active():
            if stream.gateway and not self._still_serves(stream):
                self._refuse(
                    context,
                    "Subscribe",
                    str(stream.identity),
                    stream.gateway,
                    f"{stream.identity} no longer serves Gateway {stream.gateway} (the config changed)",
                )
            if stream.pending is None:
                response = self._next_response(stream)
                if response is not None:
                    yield response
            item = stream.inbox.get()
            if item is _CLOSED:
                return
            if item is _WAKE:
                continue
            self._handle(stream, item, context)

    def _handle(
        self, stream: _Stream, req: relay_pb2.SubscribeRequest, context: grpc.ServicerContext
    ) -> None:
        which = req.WhichOneof("request")
        if which == "subscribe":
            if stream.gateway:
                if (req.subscribe.node, req.subscribe.gateway) != ("", stream.gateway):
                    self._refuse(
                        context,
                        "Subscribe",
                        str(stream.identity),
                        req.subscribe.gateway or req.subscribe.node,
                        f"a stream for Gateway {stream.gateway} cannot switch to another subscriber",
                    )
            else:
                self._check_node(context, "Subscribe", stream.node, req.subscribe.node)
            stream.types = frozenset(req.subscribe.types)
            stream.nacked_version = -1  # a new request deserves an answer, even at a version it NACKed
            return
        msg = req.ack if which == "ack" else req.nack
        pending = stream.pending
        if pending is None or msg.nonce != pending.nonce:
            self._count("stale_acks")
            return
        stream.pending = None
        if which == "ack":
            stream.acked = pending.state
            stream.acked_version = pending.version
            with self._lock:
                self._acked[stream.node] = pending.version
                self._counters["acks"] += 1
                self._count_reply(stream.node, "acks")
            return
        stream.nacked_version = pending.version
        record = NackRecord(stream.node, pending.version, pending.nonce, req.nack.error, time.time())
        with self._lock:
            self._nacks[stream.node] = record
            self._counters["nacks"] += 1
            self._count_reply(stream.node, "nacks")
        log.warning(
            "node %s rejected version %d: %s",
            stream.node,
            pending.version,
            req.nack.error,
            extra={"event": "relay_nack", "node": stream.node, "version": pending.version},
        )

    def _view(self, stream: _Stream) -> tuple[int, str, View]:
        with self._lock:
            index = self._index
            gateways = self._gateways
            peers = set(self._peers.get(stream.node, ()))
        if stream.gateway:
            gv = gateways.view(stream.gateway, index.peer_resource)
            self._report_refusals(stream, index.snapshot.version, gv.refusals)
            return (
                index.snapshot.version,
                index.snapshot.content_hash,
                filter_types(gv.resources, stream.types),
            )
        return (
            index.snapshot.version,
            index.snapshot.content_hash,
            filter_types(index.view(stream.node, peers), stream.types),
        )

    def _report_refusals(self, stream: _Stream, version: int, refusals: Iterable[ReferenceRefusal]) -> None:
        """Each reference the gateway may not follow: counted, logged and audited once per version."""
        if stream.refusals_reported == version:
            return
        stream.refusals_reported = version
        for r in refusals:
            self._count("references_refused")
            fields = {
                "gateway": r.gateway,
                "identity": str(stream.identity),
                "kind": r.kind,
                "target": r.target,
                "reason": r.reason,
                "version": version,
            }
            audit_log.warning(
                "gateway %s: %s %s not sent: %s",
                r.gateway,
                r.kind,
                r.target,
                r.reason,
                extra={"event": "gateway_reference_refused", **fields},
            )
            if self.audit is not None:
                self.audit.record("gateway_reference_refused", **fields)

    def _next_response(self, stream: _Stream) -> relay_pb2.SubscribeResponse | None:
        version, digest, view = self._view(stream)
        if version == stream.nacked_version:
            return None  # the node rejected this version: wait for the next one
        changed = [r for k, r in view.items() if stream.acked.get(k) != r.hash]
        removed = [k for k in stream.acked if k not in view]
        if not changed and not removed and version == stream.acked_version and stream.greeted:
            return None
        stream.greeted = True
        nonce = f"{next(self._nonce)}-{secrets.token_hex(4)}"
        stream.pending = _Pending(nonce, version, {k: r.hash for k, r in view.items()})
        with self._lock:
            self._counters["responses"] += 1
            self._counters["resources_sent"] += len(changed)
            self._counters["removals_sent"] += len(removed)
            if not stream.acked:
                self._counters["full_responses"] += 1
        response = delta_response(changed, removed)
        response.version, response.nonce = version, nonce
        response.content_hash, response.trust_domain = digest, self.trust_domain
        return response

    # -- Lookup ----------------------------------------------------------------------------------------
    def Lookup(
        self, request: relay_pb2.LookupRequest, context: grpc.ServicerContext
    ) -> relay_pb2.LookupResponse:
        node = self._peer_node(context, "Lookup")
        self._check_node(context, "Lookup", node, request.node)
        listing = request.address == LIST_ALL
        with self._lock:
            index = self._index
            self._counters["listings" if listing else "lookups"] += 1
        keys = index.all_workload_keys() if listing else index.lookup(request.address)
        local = index.local_keys(node)
        peers = [k for k in keys if k not in local]
        if peers and not listing:  # a listing is for the operator's eyes: nothing joins the subscription
            self._add_peers(node, peers)
        elif not keys:
            self._remember_miss(node, request.address)
        out = relay_pb2.LookupResponse(version=index.snapshot.version)
        for k in keys:
            res = index.snapshot.resources[k] if k in local else index.peer_resource(k)
            if res is not None:
                out.resources.add(type=res.kind, key=k, hash=res.hash, document=res.document)
        return out

    def _add_peers(self, node: str, keys: list[str]) -> None:
        with self._lock:
            held = self._peers.setdefault(node, set())
            new = set(keys) - held
            held.update(new)
            streams = [s for s in self._streams if s.node == node] if new else []
        for s in streams:
            s.inbox.put(_WAKE)


def delta_response(changed: Iterable[StoredResource], removed: Iterable[str]) -> relay_pb2.SubscribeResponse:
    """The resources to add/replace and the keys to drop, grouped by type (version and nonce left unset)."""
    deltas: dict[str, relay_pb2.TypeDelta] = {}
    for r in changed:
        delta = deltas.setdefault(r.kind, relay_pb2.TypeDelta(type=r.kind))
        delta.resources.add(type=r.kind, key=str(r.key), hash=r.hash, document=r.document)
    for k in removed:
        t = key_type(k)
        deltas.setdefault(t, relay_pb2.TypeDelta(type=t)).removed.append(k)
    return relay_pb2.SubscribeResponse(deltas=[deltas[t] for t in sorted(deltas)])
