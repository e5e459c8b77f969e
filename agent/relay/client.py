"""The agent's side of the relay: subscribe, apply each update whole or not at all, ACK/NACK, resume.

An update is parsed into a complete new MeshSnapshot beside the current one, handed to `validate` (the policy
engine compiles it there), and only then swapped in; any failure NACKs with the error text and the node
stays on its last good snapshot. When the plane is unreachable the last good snapshot stays in force and
the client reconnects with capped exponential backoff (with jitter, so nodes do not reconnect in lockstep),
stating what it holds so the plane sends only the difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from agent.state import MeshSnapshot
from api import relay_pb2, relay_pb2_grpc
from api.keepalive import RELAY_KEEPALIVE, Keepalive
from api.resources import KINDS, key_of, load_kinds, parse
from api.resources.workload import Workload

LIST_ALL = "*"  # LookupRequest.address that lists every workload (api/relay.proto)
log = logging.getLogger("ambit.agent.relay")

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
LOOKUP_TIMEOUT = 2.0
NEGATIVE_LOOKUP_TTL = 5.0  # an address the plane does not know is not asked again for this long
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a first sync of a large view exceeds gRPC's 4 MiB default


class LookupFailed(Exception):
    """The plane could not be asked (unreachable, timed out, bad answer): the address's owner is unknown.

    Distinct from "nobody holds it" (lookup returns None): a caller must not treat a mesh address as
    outside the mesh because a lookup failed (docs/proxy.md, "never fail open")."""


@dataclass(frozen=True)
class _Held:
    hash: str
    obj: Any


class RelayClient:
    def __init__(
        self,
        target: str,
        node: str,
        credentials: grpc.ChannelCredentials | Callable[[], grpc.ChannelCredentials],
        on_snapshot: Callable[[MeshSnapshot], None],
        validate: Callable[[MeshSnapshot], None] | None = None,
        server_name: str | None = None,
        types: tuple[str, ...] | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        keepalive: Keepalive = RELAY_KEEPALIVE,
        gateway: str = "",
    ) -> None:
        load_kinds()
        # An edge gateway's subscription (api/relay.proto Subscribe.gateway): `node` is then "" on the wire.
        self.gateway = gateway
        self.target = target
        self.node = node
        self.types = tuple(sorted(KINDS)) if types is None else types
        self._credentials = credentials
        self._on_snapshot = on_snapshot
        self._validate = validate
        self._options: list[tuple[str, Any]] = [
            # A silently dead plane (no RST, e.g. a partition) is noticed by keepalive, then we reconnect;
            # the plane's ping policy is derived from the same Keepalive (api/keepalive.py).
            *keepalive.client_options(),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._backoff = (backoff_initial, backoff_max)
        self._apply_lock = threading.RLock()  # one update (stream or lookup) applied at a time, in order
        self._snapshot = MeshSnapshot(node=node)
        self._held: dict[str, _Held] = {}  # what the node ACKed: key -> (hash, parsed object)
        self._looked_up: dict[str, tuple[int, Workload]] = {}  # uid -> (plane version, peer) until streamed
        self._negative: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._call: Any = None
        self._channel: grpc.Channel | None = None
        self._conn_lock = threading.Lock()
        self.connected = False
        self.last_error = ""
        self._counters = dict.fromkeys(
            ("responses", "acks", "nacks", "reconnects", "lookups", "lookup_errors", "resources_received"), 0
        )

    # -- public state ----------------------------------------------------------------------------------
    @property
    def snapshot(self) -> MeshSnapshot:
        return self._snapshot

    @property
    def version(self) -> int:
        return self._snapshot.version

    def counters(self) -> dict[str, int]:
        with self._conn_lock:
            return dict(self._counters)

    def status(self) -> dict[str, Any]:
        """For the admin API / `ambit debug config`: where, whether connected, what version, last error."""
        snap = self._snapshot
        return {
            "target": self.target,
            "node": self.node,
            "connected": self.connected,
            "version": snap.version,
            "resources": len(self._held),
            "last_error": self.last_error,
            **self.counters(),
        }

    def _count(self, name: str, n: int = 1) -> None:
        with self._conn_lock:
            self._counters[name] += n

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.node}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._conn_lock:
            call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            got_response = self._stream_once()
            if self._stop.is_set():
                return
            self._count("reconnects")
            delay = self._backoff[0] if got_response else min(delay * 2, self._backoff[1])
            # Full jitter on half the delay: spread reconnects of many nodes after a plane restart.
            self._stop.wait(delay / 2 + random.uniform(0, delay / 2))

    def _stream_once(self) -> bool:
        """One subscription stream until it breaks; True if at least one response arrived."""
        outbox: queue.Queue[relay_pb2.SubscribeRequest | None] = queue.Queue()
        outbox.put(relay_pb2.SubscribeRequest(subscribe=self._subscribe_message()))
        channel = self._new_channel()
        got = False
        try:
            call = relay_pb2_grpc.RelayStub(channel).Subscribe(_drain(outbox))
            with self._conn_lock:
                self._call, self._channel = call, channel
            if self._stop.is_set():
                call.cancel()
            for response in call:
                got = True
                self.connected = True
                outbox.put(self._on_response(response))
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code != grpc.StatusCode.CANCELLED or not self._stop.is_set():
                self.last_error = f"{code}: {exc.details() if hasattr(exc, 'details') else exc}"
                log.warning("relay stream to %s broke: %s", self.target, self.last_error)
        finally:
            self.connected = False
            outbox.put(None)
            with self._conn_lock:
                self._call, self._channel = None, None
            channel.close()
        return got

    def _new_channel(self) -> grpc.Channel:
        # A callable is asked on every (re)connect, so a renewed node certificate is used from then on.
        creds = self._credentials() if callable(self._credentials) else self._credentials
        return grpc.secure_channel(self.target, creds, options=self._options)

    def _subscribe_message(self) -> relay_pb2.Subscribe:
        with self._apply_lock:
            sub = relay_pb2.Subscribe(
                node="" if self.gateway else self.node,
                types=self.types,
                resume_version=self.version,
                gateway=self.gateway,
            )
            for key, held in self._held.items():
                sub.initial_resource_versions[held.obj.kind].versions[key] = held.hash
        return sub

    # -- applying updates ------------------------------------------------------------------------------
    def _on_response(self, resp: relay_pb2.SubscribeResponse) -> relay_pb2.SubscribeRequest:
        self._count("responses")
        with self._apply_lock:
            if not resp.deltas and resp.version == self.version:
                # "You are current" (the first answer after a resume with nothing new): nothing to apply.
                self._count("acks")
                return relay_pb2.SubscribeRequest(ack=relay_pb2.Ack(nonce=resp.nonce, version=resp.version))
            try:
                held, snapshot = self._build(resp)
                if self._validate is not None:
                    self._validate(snapshot)
            except Exception as exc:
                self._count("nacks")
                log.warning("rejecting config version %d: %s", resp.version, exc)
                return relay_pb2.SubscribeRequest(
                    nack=relay_pb2.Nack(nonce=resp.nonce, version=resp.version, error=str(exc) or repr(exc))
                )
            self._held = held
            self._publish(snapshot)
        self._count("acks")
        return relay_pb2.SubscribeRequest(ack=relay_pb2.Ack(nonce=resp.nonce, version=resp.version))

    def _build(self, resp: relay_pb2.SubscribeResponse) -> tuple[dict[str, _Held], MeshSnapshot]:
        held = dict(self._held)
        received = 0
        for delta in resp.deltas:
            for key in delta.removed:
                held.pop(key, None)
            for res in delta.resources:
                held[res.key] = _Held(
                    res.hash, _parse_resource(res, f"relay {res.key} (version {resp.version})")
                )
                received += 1
        self._count("resources_received", received)
        trust_domain = resp.trust_domain or self._snapshot.trust_domain
        objects = [h.obj for h in held.values()]
        # Peers learnt by lookup stay until the stream carries them, or a later version shows they are gone.
        for uid, (version, w) in list(self._looked_up.items()):
            if f"Workload/{uid}" in held or resp.version > version:
                del self._looked_up[uid]
            else:
                objects.append(w)
        return held, MeshSnapshot.from_objects(resp.version, trust_domain, self.node, objects)

    def _publish(self, snapshot: MeshSnapshot, notify: bool = True) -> None:
        self._snapshot = snapshot
        if not notify:
            return
        try:
            self._on_snapshot(snapshot)
        except Exception:
            log.exception("applying config version %d failed after it was accepted", snapshot.version)

    # -- on-demand lookup ------------------------------------------------------------------------------
    def lookup(self, ip: str, timeout: float = LOOKUP_TIMEOUT, notify: bool = True) -> Workload | None:
        """The workload holding `ip`, asking the plane if this node does not know it yet (blocking).

        None: the plane holds no workload there (cached NEGATIVE_LOOKUP_TTL). Raises LookupFailed when the
        plane could not answer (never cached). The answer is merged into the snapshot (same version) and,
        with `notify`, on_snapshot is called."""
        known = self._snapshot.workload_by_ip(ip)
        if known is not None:
            return known
        if self._negative.get(ip, 0.0) > time.monotonic():
            return None
        self._count("lookups")
        try:
            resp = self._lookup_rpc(ip, timeout)
            workloads = [_parse_resource(r, f"lookup {ip}: {r.key}") for r in resp.resources]
        except (grpc.RpcError, ValueError) as exc:
            self._count("lookup_errors")
            raise LookupFailed(f"lookup of {ip} failed: {_rpc_reason(exc)}") from exc
        peers = [w for w in workloads if isinstance(w, Workload)]
        if not peers:
            self._negative[ip] = time.monotonic() + NEGATIVE_LOOKUP_TTL
            return None
        with self._apply_lock:
            for w in peers:
                if f"Workload/{w.uid}" not in self._held:
                    self._looked_up[w.uid] = (resp.version, w)
            self._publish(self._snapshot.with_workloads(peers), notify)
        return self._snapshot.workload_by_ip(ip)

    def reachable(self, timeout: float = LOOKUP_TIMEOUT) -> list[Workload]:
        """Every workload of the mesh as the plane lists it (minimal form, as lookups give them), for
        `ambit debug reachable`. Nothing is merged into the snapshot or added to the subscription."""
        resp = self._lookup_rpc(LIST_ALL, timeout)
        parsed = [_parse_resource(r, f"listing: {r.key}") for r in resp.resources]
        return [w for w in parsed if isinstance(w, Workload)]

    def _lookup_rpc(self, ip: str, timeout: float) -> relay_pb2.LookupResponse:
        with self._conn_lock:
            channel = self._channel
        request = relay_pb2.LookupRequest(node=self.node, address=ip)
        if channel is not None:
            return relay_pb2_grpc.RelayStub(channel).Lookup(request, timeout=timeout)
        with self._new_channel() as temporary:
            return relay_pb2_grpc.RelayStub(temporary).Lookup(request, timeout=timeout)


def _rpc_reason(exc: Exception) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code()}: {exc.details()}"
    return str(exc)


def _drain(outbox: queue.Queue[relay_pb2.SubscribeRequest | None]) -> Iterator[relay_pb2.SubscribeRequest]:
    while True:
        item = outbox.get()
        if item is None:
            return
        yield item


def _parse_resource(res: relay_pb2.Resource, where: str) -> Any:
    """Wire resource -> domain object, checking it is what the plane says it is (hash, kind, key)."""
    if hashlib.sha256(res.document).hexdigest() != res.hash:
        raise ValueError(f"{where}: content hash mismatch")
    try:
        doc = json.loads(res.document)
    except ValueError as exc:
        raise ValueError(f"{where}: not JSON: {exc}") from None
    obj = parse(doc, where)
    if obj.kind != res.type or str(key_of(obj)) != res.key:
        raise ValueError(f"{where}: document is {key_of(obj)}, not {res.key}")
    return obj
