"""Python API over the cffi extension; with native/pki.py (certificates), the only module that touches
`native._engine`.

The engine runs its own epoll loop thread(s) in C. Python hands it sockets (by fd: the engine owns and
closes them from then on), TLS material and decisions; it reports what happened as `Event`s, drained with
`events()` whenever `eventfd` is readable. Connections and splices share one id space (`close()` takes
either); stream ids (engine-assigned, not HTTP/2 stream ids) and TLS context ids have their own.

Byte counters in events: a stream's `bytes_in`/`bytes_out` are DATA payload received from / sent to the
HBONE peer; a connection's are TLS plaintext bytes; a splice's `bytes_in` is what was read from `fd_a`
(written to `fd_b`) and `bytes_out` what was written to `fd_a`. Every connection ends with exactly one
`conn_closed` (preceded by `conn_error` when it failed), after the end events of all its streams.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from native._engine import ffi, lib  # type: ignore[import-not-found]

_KINDS = {
    1: "handshake_done",
    2: "conn_error",
    3: "conn_closed",
    4: "peer_verified",
    5: "stream_request",
    6: "stream_open",
    7: "stream_refused",
    8: "stream_closed",
    9: "splice_closed",
    10: "peer_goaway",
    11: "fast_open",  # the fast path opened a stream (status: client port, bytes_in: entry id)
    12: "fast_miss",  # the fast path handed an accepted socket to Python (status: its fd, now the caller's)
    13: "upstream_failed",  # accept_connect: the engine's connect failed (status: errno, detail); 503 follows
    14: "stream_accepted",  # accept_connect: connected, 200 sent
    15: "fast_accept",  # inbound fast path accepted a stream (bytes_in: entry, bytes_out: 0 up / 1 failed)
}
FAST_MAX_CONNS = 8  # AMBIT_FAST_MAX_CONNS: pooled connections one fast path entry may name
# Engine limits (ambit_engine_set_limit); 0 means unlimited, see docs/engine.md.
LIMITS = {
    "pending_handshakes": 0,
    "pending_per_source": 1,
    "conns_per_source": 2,
    "streams_per_peer": 3,
    "max_concurrent_streams": 4,
    "resets_per_s": 5,
    "stream_buffer": 6,
    "conn_buffer": 7,
}
_ERRLEN = 512
# ambit_flow_state: what a live stream or splice is doing (docs/engine.md, "Live flows").
FLOW_STATES = {0: "unknown", 1: "connecting", 2: "open", 3: "half_closed", 4: "closing"}


class Ending(enum.Enum):
    """How a stream or splice ended, from its close event's `detail` (the engine's vocabulary:
    native/src/hbone.c stream_finish, native/src/pump.c). "Socket" is the stream's own TCP socket (the
    client's on the connecting side, the destination pod's on the serving side); a splice's side a is
    fd_a."""

    NORMAL = ""  # END_STREAM / EOF both ways
    PEER_RESET = "reset by peer"  # the HBONE peer reset the stream (RST_STREAM)
    SOCKET_FAILED = "socket error"  # the stream's socket failed (the application reset it)
    AGENT_RESET = "reset by agent"  # reset_stream(), or close() of a splice
    CONNECTION_CLOSED = "connection closed"  # its HBONE connection ended before the stream did
    SPLICE_A_FAILED = "a"  # "a: <strerror>": reading or writing fd_a failed
    SPLICE_B_FAILED = "b"
    OTHER = "other"  # an engine-side failure (e.g. a socket it could not watch)

    __hash__ = object.__hash__  # members are singletons: a C identity hash (Enum's is Python, per lookup)


_SPLICE_BY_AGENT = "closed by agent"
_HANDSHAKE_FAILED = "TLS handshake failed"


def refused_certificate(ev: Event) -> bool:
    """Whether a conn_error is the handshake refusing the peer's certificate (untrusted, CA:true, no
    single URI SAN, not an accepted workload identity, none at all): an identity decision, unlike a
    handshake that failed on garbage or a timeout."""
    return ev.detail.startswith(_HANDSHAKE_FAILED) and ("certificate" in ev.detail or "identity" in ev.detail)


def ending(ev: Event) -> Ending:
    """How the stream (stream_closed) or splice (splice_closed) of `ev` ended."""
    if ev.kind == "splice_closed":
        side = ev.detail.partition(":")[0]
        if ev.detail == _SPLICE_BY_AGENT:
            return Ending.AGENT_RESET
        if side in ("a", "b") and ev.detail.startswith(side + ": "):
            return Ending.SPLICE_A_FAILED if side == "a" else Ending.SPLICE_B_FAILED
        return Ending.NORMAL if not ev.detail else Ending.OTHER
    found = _STREAM_ENDINGS.get(ev.detail)
    return Ending.OTHER if found is None else found


_STREAM_ENDINGS = {
    e.value: e
    for e in (
        Ending.NORMAL,
        Ending.PEER_RESET,
        Ending.SOCKET_FAILED,
        Ending.AGENT_RESET,
        Ending.CONNECTION_CLOSED,
    )
}


class EngineError(Exception):
    """A call the engine refused (bad argument, stopped engine, bad TLS material)."""


class Event(NamedTuple):
    """One engine event (immutable). A named tuple, not a dataclass: one is built per event on the proxy's
    hot path, and a frozen dataclass's constructor costs several times as much."""

    kind: str
    conn_id: int
    stream_id: int
    tag: int
    authority: str = ""
    forwarded: str = ""  # stream_request: the raw `forwarded` header ("" when absent; never trusted here)
    baggage: str = ""  # stream_request: the peer's `baggage` header ("" when absent, repeated or too long)
    traceparent: str = ""  # stream_request: the peer's `traceparent` header (same rules)
    peer_id: str = ""
    tls_version: str = ""
    tls_cipher: str = ""
    peer_cert_sha256: str = ""
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    detail: str = ""


@dataclass(frozen=True)
class FlowStats:
    """A live stream's or splice's byte counts so far (same meaning as its end event's) and state; state
    "unknown" (counts 0) when the engine holds no such stream or splice (ended, or never existed)."""

    state: str
    bytes_in: int
    bytes_out: int


def crypto_version() -> str:
    """The OpenSSL build the engine links, e.g. 'OpenSSL 3.0.19 ...'."""
    return str(ffi.string(lib.ambit_crypto_version()).decode())


def cert_is_ca(pem: bytes) -> bool:
    """Whether the first certificate of `pem` may act as a CA (CA:true or keyCertSign): the check every
    HBONE handshake applies to the peer's leaf (end entities must be CA:false), for reuse by the relay and
    the plane. Raises EngineError when the PEM does not parse."""
    rv = int(lib.ambit_cert_is_ca(pem, len(pem)))
    if rv < 0:
        raise EngineError("not a PEM certificate")
    return rv == 1


def forwarded_for(ip: str, port: int = 0) -> bytes:
    """The RFC 7239 `forwarded` value naming `ip` (and its source `port` when not 0) as the client:
    for=192.0.2.1, for="192.0.2.1:40000", for="[2001:db8::1]", for="[2001:db8::1]:40000" (a node with a
    port, or an IPv6 one, is a quoted-string: RFC 7239 section 6)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise EngineError(f"forwarded: {ip!r} is not an IP address") from None
    if not 0 <= port <= 65535:
        raise EngineError(f"forwarded: port {port} is not 0-65535")
    suffix = f":{port}" if port else ""
    if addr.version == 6:
        if addr.scope_id:  # type: ignore[union-attr]
            raise EngineError(f"forwarded: {ip!r} has a zone")
        return f'for="[{addr.compressed}]{suffix}"'.encode()
    return (f'for="{addr.compressed}{suffix}"' if port else f"for={addr.compressed}").encode()


def _extra_headers(headers: Sequence[tuple[str, str]]) -> bytes:
    out = []
    for name, value in headers:
        if not name or name != name.lower() or any(ch in name for ch in ":\r\n\0 "):
            raise EngineError(f"bad header name {name!r}")
        if any(ch in value for ch in "\r\n\0"):
            raise EngineError(f"bad value for header {name!r}")
        out.append(f"{name}: {value}\n")
    return "".join(out).encode()


def _text(field: Any) -> str:
    if field[0] == b"\0":
        return ""
    return bytes(ffi.string(field)).decode("utf-8", "replace")


def _layout() -> tuple[int, list[tuple[int, int]], int, tuple[int, int]]:
    """The ambit_event struct as the decoder reads it: its size, (offset, size) of each text field in
    Event's order up to `status`, the offset of `status` (then bytes_in, bytes_out) and `detail`'s span.
    The numeric fields must sit where the two `struct` formats below read them: checked here, at import,
    against cffi's view of engine.h."""
    size = int(ffi.sizeof("ambit_event"))
    fields = dict(ffi.typeof("ambit_event").fields)
    off = {name: int(ffi.offsetof("ambit_event", name)) for name in fields}
    if (off["conn_id"], off["stream_id"], off["tag"]) != (8, 16, 24) or (
        off["bytes_in"] - off["status"],
        off["bytes_out"] - off["status"],
    ) != (4, 12):
        raise ImportError("native engine: ambit_event layout is not the one native/engine.py decodes")
    texts = ("authority", "forwarded", "baggage", "traceparent", "peer_id", "tls_version", "tls_cipher",
             "peer_cert_sha256")  # fmt: skip
    spans = [(off[t], int(ffi.sizeof(fields[t].type))) for t in (*texts, "detail")]
    return size, spans[:-1], off["status"], spans[-1]


_EV_SIZE, _EV_TEXTS, _EV_STATUS, _EV_DETAIL = _layout()
_EV_HEAD = struct.Struct("=i4xQQQ")  # kind, conn_id, stream_id, tag
_EV_TAIL = struct.Struct("=iQQ")  # status, bytes_in, bytes_out


def _decode(raw: bytes, n: int) -> list[Event]:
    """`n` events from a copy of the engine's buffer: numeric fields by two struct reads each, a text
    field only when its first byte is not NUL (most are empty for most kinds)."""
    out = []
    detail_off, detail_len = _EV_DETAIL
    for base in range(0, n * _EV_SIZE, _EV_SIZE):
        kind, conn_id, stream_id, tag = _EV_HEAD.unpack_from(raw, base)
        fields: list[Any] = [_KINDS.get(kind) or f"unknown_{kind}", conn_id, stream_id, tag]
        fields += [_cstr(raw, base + o, size) if raw[base + o] else "" for o, size in _EV_TEXTS]
        fields += _EV_TAIL.unpack_from(raw, base + _EV_STATUS)  # status, bytes_in, bytes_out
        at = base + detail_off
        fields.append(_cstr(raw, at, detail_len) if raw[at] else "")
        out.append(Event._make(fields))
    return out


def _cstr(raw: bytes, at: int, size: int) -> str:
    end = raw.find(b"\0", at, at + size)
    return raw[at : (at + size if end < 0 else end)].decode("utf-8", "replace")


class Engine:
    """One native engine: `threads` epoll loops; connections are spread over them by id."""

    def __init__(self, threads: int = 1) -> None:
        err = ffi.new("char[]", _ERRLEN)
        handle = lib.ambit_engine_new(threads, err, _ERRLEN)
        if handle == ffi.NULL:
            raise EngineError(_text(err))
        self._handle = handle
        self._lock = threading.Lock()  # guards _handle against stop() racing a call
        self._buf = ffi.new("ambit_event[]", 256)
        self._buf_len = 256
        self._err = ffi.new("char[]", _ERRLEN)  # _call's, under _lock
        self.eventfd: int = int(lib.ambit_engine_eventfd(handle))

    def _h(self) -> object:
        if self._handle is None:
            raise EngineError("engine stopped")
        return self._handle

    def _call(self, fn: object, *args: object) -> int:
        with self._lock:  # one error buffer for every call: they hold the lock (a cffi allocation saved)
            err = self._err
            err[0] = b"\0"
            rv = int(fn(self._h(), *args, err, _ERRLEN))  # type: ignore[operator]
            if rv < 0:
                raise EngineError(_text(err))
        return rv

    def set_timeouts(
        self, handshake_s: float = 10.0, keepalive_idle_s: float = 30.0, keepalive_timeout_s: float = 10.0
    ) -> None:
        """TLS handshake deadline; HTTP/2 PING after `keepalive_idle_s` of silence, and the connection ends
        (conn_error) when nothing arrives within `keepalive_timeout_s` of it. 0 disables each."""
        with self._lock:
            lib.ambit_engine_set_timeouts(
                self._h(),
                int(handshake_s * 1000),
                int(keepalive_idle_s * 1000),
                int(keepalive_timeout_s * 1000),
            )

    def set_limits(self, **limits: int) -> None:
        """Caps by name (LIMITS), each refusing only the offending peer's new work, counted:
        pending_handshakes (engine-wide) and pending_per_source, conns_per_source, streams_per_peer
        (all connections of one authenticated identity), max_concurrent_streams (advertised to new
        connections), resets_per_s (per peer identity; beyond it GOAWAY ENHANCE_YOUR_CALM), stream_buffer
        and conn_buffer (bytes read from sockets awaiting the peer's window). 0 = unlimited."""
        for name, value in limits.items():
            which = LIMITS.get(name)
            if which is None:
                raise EngineError(f"unknown limit {name!r}")
            with self._lock:
                rv = int(lib.ambit_engine_set_limit(self._h(), which, int(value)))
            if rv < 0:
                raise EngineError(f"bad value {value!r} for limit {name}")

    def set_peer_trust_domains(self, domains: Sequence[str] | None) -> None:
        """Served handshakes accept only a client whose single URI SAN is a workload ID
        (spiffe://TD/ns/NS/sa/SA) of one of `domains` (none when empty); any other is refused in the
        handshake, with a TLS alert (`conn_error` "TLS handshake failed: peer identity is no workload of an
        accepted trust domain", its `peer_id` the presented ID). None (the default): no such rule."""
        for td in domains or ():
            if not td or any(ch in td for ch in "\n/\0"):
                raise EngineError(f"bad trust domain {td!r}")
        arg = ffi.NULL if domains is None else "\n".join(domains).encode()
        with self._lock:
            if int(lib.ambit_engine_set_peer_domains(self._h(), arg)) < 0:
                raise EngineError("out of memory")

    def start(self) -> None:
        self._call(lib.ambit_engine_start)

    def stop(self) -> None:
        """Stops the loops and closes every fd the engine owns (including `eventfd`). Idempotent."""
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            lib.ambit_engine_free(handle)

    def events(self, max_events: int = 256) -> list[Event]:
        """Pending events, oldest first, without blocking."""
        with self._lock:
            if self._handle is None:
                return []
            if max_events > self._buf_len:
                self._buf = ffi.new("ambit_event[]", max_events)
                self._buf_len = max_events
            n = int(lib.ambit_engine_events(self._handle, self._buf, max_events))
            raw = ffi.buffer(self._buf, n * _EV_SIZE)[:] if n else b""  # one copy; the buffer is reused
        return _decode(raw, n)

    def tls_context(
        self, *, server: bool, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, tls12: bool = False
    ) -> int:
        """An mTLS context (peer verified against `bundle_pem` always); the key stays in memory."""
        return self._call(
            lib.ambit_tls_context,
            int(server),
            chain_pem,
            len(chain_pem),
            key_pem,
            len(key_pem),
            bundle_pem,
            len(bundle_pem),
            int(tls12),
        )

    def free_tls_context(self, ctx: int) -> None:
        with self._lock:
            if self._handle is not None and lib.ambit_free_tls_context(self._handle, ctx) < 0:
                raise EngineError(f"unknown TLS context {ctx}")

    def connect_hbone(self, fd: int, ctx: int, expected_peer: str, tag: int = 0) -> int:
        return self._call(lib.ambit_connect_hbone, fd, ctx, expected_peer.encode(), tag)

    def open_stream(
        self,
        conn_id: int,
        authority: str,
        local_fd: int,
        tag: int = 0,
        forwarded: str = "",
        headers: Sequence[tuple[str, str]] = (),
        forwarded_port: int = 0,
    ) -> int:
        """A CONNECT stream to `authority`; `forwarded` (an IP address, or "") names the client to the peer
        as the request header `forwarded: for=<ip>` (RFC 7239; IPv6 quoted and bracketed), with the client's
        source port when `forwarded_port` is set (`for="<ip>:<port>"`, as ztunnel sends). `headers`: more
        request headers (e.g. baggage, traceparent): lowercase names, at most 8, 2 KiB in all; a malformed
        one raises EngineError (checked here) or refuses the stream (stream_refused, checked in C)."""
        try:
            header = forwarded_for(forwarded, forwarded_port) if forwarded else ffi.NULL
            extra = _extra_headers(headers) if headers else ffi.NULL
        except EngineError:
            os.close(local_fd)  # the engine owns local_fd from the call on, even when it fails
            raise
        return self._call(lib.ambit_open_stream, conn_id, authority.encode(), header, extra, local_fd, tag)

    def serve_hbone(self, fd: int, ctx: int, tag: int = 0) -> int:
        return self._call(lib.ambit_serve_hbone, fd, ctx, tag)

    def accept_stream(self, conn_id: int, stream_id: int, upstream_fd: int, tag: int = 0) -> None:
        self._call(lib.ambit_accept_stream, conn_id, stream_id, upstream_fd, tag)

    def accept_connect(
        self,
        conn_id: int,
        stream_id: int,
        destination: tuple[str, int],
        source_ip: str | None,
        mark: int,
        tag: int = 0,
    ) -> None:
        """Accept a served stream once the engine's own connect to `destination` succeeds (from
        `source_ip` with IP_TRANSPARENT when given; SO_MARK `mark`): `stream_accepted` then, else
        `upstream_failed` and a 503. EngineError when the socket cannot be made (e.g. bind)."""
        ip, port = destination
        src = source_ip.encode() if source_ip else ffi.NULL
        self._call(lib.ambit_accept_connect, conn_id, stream_id, ip.encode(), port, src, mark, tag)

    def reject_stream(self, conn_id: int, stream_id: int, status: int) -> None:
        self._call(lib.ambit_reject_stream, conn_id, stream_id, status)

    def reset_stream(self, conn_id: int, stream_id: int) -> None:
        self._call(lib.ambit_reset_stream, conn_id, stream_id)

    def splice(self, fd_a: int, fd_b: int, tag: int = 0) -> int:
        return self._call(lib.ambit_splice, fd_a, fd_b, tag)

    def close(self, conn_id: int) -> None:
        """Graceful end of an HBONE connection (GOAWAY, streams finish, close_notify) or of a splice."""
        self._call(lib.ambit_close, conn_id)

    def flow_stats(self, flows: Sequence[tuple[int, int]], timeout_s: float = 2.0) -> list[FlowStats]:
        """Live counts of `flows`, each (conn_id, stream_id) for a stream or (splice_id, 0) for a splice, in
        order. Answered by the loop threads that own them (one command per loop per 4,096 flows); the
        engine lock is only held to post, so events keep flowing while the loops answer. Raises
        EngineError when the engine is stopped or a loop does not answer within `timeout_s`."""
        out: list[FlowStats] = []
        batch = int(lib.AMBIT_FLOW_QUERY_MAX)
        for start in range(0, len(flows), batch):
            out += self._flow_batch(flows[start : start + batch], timeout_s)
        return out

    def _flow_batch(self, flows: Sequence[tuple[int, int]], timeout_s: float) -> list[FlowStats]:
        n = len(flows)
        items = ffi.new("ambit_flow_stats[]", n)
        for i, (conn_id, stream_id) in enumerate(flows):
            items[i].conn_id, items[i].stream_id = conn_id, stream_id
        err = ffi.new("char[]", _ERRLEN)
        with self._lock:
            query = lib.ambit_flow_query_post(self._h(), items, n, err, _ERRLEN)
        if query == ffi.NULL:
            raise EngineError(_text(err))
        if lib.ambit_flow_query_wait(query, items, n, int(timeout_s * 1000)) < 0:
            raise EngineError(f"engine loops did not answer a flow query within {timeout_s} s")
        return [
            FlowStats(FLOW_STATES.get(it.state, "unknown"), int(it.bytes_in), int(it.bytes_out))
            for it in (items[i] for i in range(n))
        ]

    def counters(self) -> dict[str, int]:
        with self._lock:
            if self._handle is None:
                return {}
            out = ffi.new("uint64_t[]", lib.AMBIT_C_COUNT)
            lib.ambit_engine_counters(self._handle, out, lib.AMBIT_C_COUNT)
            fast = ffi.new("uint64_t[]", lib.AMBIT_FAST_C_COUNT)
            lib.ambit_fastpath_counters(self._handle, fast, lib.AMBIT_FAST_C_COUNT)
            fast_in = ffi.new("uint64_t[]", lib.AMBIT_FASTIN_C_COUNT)
            lib.ambit_fastin_counters(self._handle, fast_in, lib.AMBIT_FASTIN_C_COUNT)
        names = {_text(lib.ambit_counter_name(i)): int(out[i]) for i in range(lib.AMBIT_C_COUNT)}
        names.update(
            {_text(lib.ambit_fastpath_counter_name(i)): int(fast[i]) for i in range(lib.AMBIT_FAST_C_COUNT)}
        )
        fast_in_names = (_text(lib.ambit_fastin_counter_name(i)) for i in range(lib.AMBIT_FASTIN_C_COUNT))
        names.update({name: int(fast_in[i]) for i, name in enumerate(fast_in_names)})
        return names

    # --- outbound fast path (docs/engine.md "Fast path") ---------------------------------------------

    def fastpath_listen(self, fd: int) -> None:
        """The engine accepts on listening socket `fd` (owned by the engine from the call on) from now on:
        installed destinations open without Python, the rest arrive as `fast_miss` events (status = fd)."""
        self._call(lib.ambit_fastpath_listen, fd)

    def fastpath_set_capacity(self, entries: int) -> None:
        with self._lock:
            if int(lib.ambit_fastpath_set_capacity(self._h(), entries)) < 0:
                raise EngineError(f"bad fast path capacity {entries!r}")

    def fastpath_invalidate(self) -> int:
        """Every installed entry stops opening streams (until removed and installed anew): the new
        generation. Safe from any thread; takes none of the proxy's locks."""
        with self._lock:
            return int(lib.ambit_fastpath_invalidate(self._h())) if self._handle is not None else 0

    def fastpath_generation(self) -> int:
        with self._lock:
            return int(lib.ambit_fastpath_generation(self._h())) if self._handle is not None else 0

    def fastpath_put(
        self,
        entry_id: int,
        generation: int,
        source_ip: str,
        destination_ip: str,
        destination_port: int,
        conns: Sequence[int],
        *,
        spread: int,
        credits: int,
        authority: str,
        forwarded: str = "",
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Install fast path entry `entry_id` (refused when `generation`, read before the routing decision,
        is no longer the engine's): up to `credits` streams from `source_ip` to
        `destination_ip:destination_port` on the least busy of `conns` (see `open_stream` for `authority`
        and `headers`; a fresh traceparent is added per stream; `forwarded`, the client's IP, is sent with
        each client's source port, `for="<ip>:<port>"`). EngineError when the table is
        full, the entry exists, or an argument is bad."""
        if not 1 <= len(conns) <= FAST_MAX_CONNS:
            raise EngineError(f"fast path entry needs 1..{FAST_MAX_CONNS} connections, got {len(conns)}")
        header = ffi.NULL
        if forwarded:
            forwarded_for(forwarded)  # validates; the engine adds each client's port (for="<ip>:<port>")
            header = str(ipaddress.ip_address(forwarded)).encode()
        extra = _extra_headers(headers) if headers else ffi.NULL
        ids = ffi.new("uint64_t[]", list(conns))
        self._call(
            lib.ambit_fastpath_put, entry_id, generation, source_ip.encode(), destination_ip.encode(),
            destination_port, ids, len(conns), spread, credits, authority.encode(), header, extra,
        )  # fmt: skip

    def fastpath_add_credits(self, entry_id: int, credits: int) -> bool:
        """More streams for an installed entry; False when it is not installed (removed meanwhile)."""
        with self._lock:
            if self._handle is None:
                return False
            return int(lib.ambit_fastpath_add_credits(self._handle, entry_id, credits)) == 0

    def fastpath_remove(self, entry_id: int) -> int:
        """Remove a fast path entry: the credits it had left, or -1 when it is not installed. No stream is
        opened by it once this returns."""
        with self._lock:
            if self._handle is None:
                return -1
            return int(lib.ambit_fastpath_remove(self._handle, entry_id))

    # --- inbound fast path (docs/engine.md "Inbound fast path") ---------------------------------------

    def fastin_set_capacity(self, entries: int) -> None:
        with self._lock:
            if int(lib.ambit_fastin_set_capacity(self._h(), entries)) < 0:
                raise EngineError(f"bad inbound fast path capacity {entries!r}")

    def fastin_invalidate(self) -> int:
        """Every installed inbound entry stops matching: the new generation. Any thread, no proxy lock."""
        with self._lock:
            return int(lib.ambit_fastin_invalidate(self._h())) if self._handle is not None else 0

    def fastin_generation(self) -> int:
        with self._lock:
            return int(lib.ambit_fastin_generation(self._h())) if self._handle is not None else 0

    def fastin_put(
        self,
        entry_id: int,
        generation: int,
        conn_id: int,
        authority: str,
        claim_ip: str,
        destination: tuple[str, int],
        source_ip: str | None,
        mark: int,
        credits: int,
    ) -> None:
        """Install inbound entry `entry_id` (refused when `generation`, read before the decision, is stale):
        up to `credits` streams on served connection `conn_id` with :authority exactly `authority` and a
        `forwarded` claiming `claim_ip` ("" = no header) are accepted as `accept_connect(conn_id, sid,
        destination, source_ip, mark)` would. EngineError when stale, full, present, or an argument is bad."""
        ip, port = destination
        src = source_ip.encode() if source_ip else ffi.NULL
        self._call(
            lib.ambit_fastin_put, entry_id, generation, conn_id, authority.encode(), claim_ip.encode(),
            ip.encode(), port, src, mark, credits,
        )  # fmt: skip

    def fastin_add_credits(self, entry_id: int, credits: int) -> bool:
        """More streams for an installed inbound entry; False when it is not installed."""
        with self._lock:
            if self._handle is None:
                return False
            return int(lib.ambit_fastin_add_credits(self._handle, entry_id, credits)) == 0

    def fastin_remove(self, entry_id: int) -> int:
        """Remove an inbound entry: the credits it had left, or -1 when not installed. It matches no stream
        once this returns."""
        with self._lock:
            if self._handle is None:
                return -1
            return int(lib.ambit_fastin_remove(self._handle, entry_id))

    def __del__(self) -> None:
        self.stop()
