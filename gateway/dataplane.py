"""Python API over the gateway's cffi extension; the only module that touches `gateway.native._gateway`.

The data plane runs its own epoll loop threads in C: it accepts on the listening sockets Python hands it,
terminates TLS, parses HTTP/1.1 (llhttp), runs libmodsecurity on each request of a WAF route, and forwards
to backends. Python builds immutable `Config`s (listeners, backends, routes in precedence order) and swaps
them in with `apply()`; the C side reports WAF decisions as `WafEvent`s, drained with `events()` whenever
`eventfd` is readable.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from gateway.native._gateway import ffi, lib  # type: ignore[import-not-found]

_ERRLEN = 512
MAX_ROUTE_SLOTS = int(lib.GW_MAX_ROUTE_SLOTS)

WAF_OFF = int(lib.GW_WAF_OFF)
WAF_DETECT = int(lib.GW_WAF_DETECT)
WAF_BLOCK = int(lib.GW_WAF_BLOCK)
ACTIONS = ("allowed", "blocked", "detected", "error", "refused")


class DataplaneError(Exception):
    """A call the data plane refused: bad rules, bad certificate, bad address, a stopped gateway."""


def _err() -> Any:
    return ffi.new("char[]", _ERRLEN)


def _text(field: Any) -> str:
    return str(ffi.string(field).decode("utf-8", errors="replace"))


def modsecurity_version() -> str:
    return _text(lib.gw_waf_version())


@dataclass(frozen=True)
class RuleMatch:
    rule_id: str
    message: str


def _matches(blob: str) -> tuple[RuleMatch, ...]:
    out = []
    for line in blob.splitlines():
        rule_id, _, message = line.partition("\t")
        out.append(RuleMatch(rule_id, message))
    return tuple(out)


@dataclass(frozen=True)
class Verdict:
    action: str
    status: int
    score: int
    rules: tuple[RuleMatch, ...]
    nrules: int
    detail: str


class WafRules:
    """A compiled libmodsecurity rule set (CRS plus our setup and exclusions); shared by routes."""

    def __init__(self, text: str) -> None:
        err = _err()
        handle = lib.gw_waf_new(text.encode(), err, _ERRLEN)
        if handle == ffi.NULL:
            raise DataplaneError(_text(err))
        self._h = ffi.gc(handle, lib.gw_waf_release)

    @property
    def handle(self) -> Any:
        return self._h

    def check(
        self,
        mode: int,
        method: str,
        uri: str,
        version: str,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        client: tuple[str, int] = ("127.0.0.1", 40000),
    ) -> Verdict:
        """One request through the rules outside the data path (config checks, tools, tests)."""
        blob = "".join(f"{k}: {v}\r\n" for k, v in headers).encode("utf-8", "surrogateescape")
        out = ffi.new("gw_verdict *")
        rc = lib.gw_waf_check(
            self._h,
            mode,
            client[0].encode(),
            client[1],
            method.encode(),
            uri.encode("utf-8", "surrogateescape"),
            version.encode(),
            blob,
            len(blob),
            body,
            len(body),
            out,
        )
        verdict = Verdict(
            ACTIONS[out.action],
            out.status,
            out.score,
            _matches(_text(out.rules)),
            out.nrules,
            _text(out.detail),
        )
        if rc < 0:
            raise DataplaneError(f"WAF error: {verdict.detail}")
        return verdict


class ServerTls:
    """The certificates of one HTTPS listener; SNI picks among them (exact names, then `*.suffix`)."""

    def __init__(self) -> None:
        err = _err()
        handle = lib.gw_tls_new(err, _ERRLEN)
        if handle == ffi.NULL:
            raise DataplaneError(_text(err))
        self._h = ffi.gc(handle, lib.gw_tls_release)

    @property
    def handle(self) -> Any:
        return self._h

    def add(self, hostname: str, chain_pem: bytes, key_pem: bytes) -> None:
        err = _err()
        if (
            lib.gw_tls_add_cert(
                self._h, hostname.encode(), chain_pem, len(chain_pem), key_pem, len(key_pem), err, _ERRLEN
            )
            < 0
        ):
            raise DataplaneError(f"certificate for {hostname or 'default'}: {_text(err)}")


@dataclass(frozen=True)
class RouteEntry:
    """One (hostname, match) of a route rule, in the table's precedence order."""

    listener_id: int
    hostname: str
    path: str
    path_exact: bool
    headers: tuple[tuple[str, str], ...]
    method: str
    backend: int
    waf: WafRules | None
    waf_mode: int
    max_body: int
    stat_slot: int
    name: str


class Config:
    """An immutable table once applied: build it, then `Gateway.apply()` it."""

    def __init__(self) -> None:
        handle = lib.gw_config_new()
        if handle == ffi.NULL:
            raise DataplaneError("out of memory")
        self._h = ffi.gc(handle, lib.gw_config_release)
        self._keep: list[Any] = []  # TLS and WAF objects outlive C's references to them

    @property
    def handle(self) -> Any:
        return self._h

    def listener(self, listener_id: int, tls: ServerTls | None) -> None:
        self._keep.append(tls)
        if lib.gw_config_listener(self._h, listener_id, tls.handle if tls else ffi.NULL) < 0:
            raise DataplaneError("out of memory")

    def backend_external(self, provider: int) -> int:
        """A backend whose connections Python opens (Gateway.events() asks, upstream_ready() answers)."""
        err = _err()
        index = int(lib.gw_config_backend_external(self._h, provider, err, _ERRLEN))
        if index < 0:
            raise DataplaneError(_text(err))
        return index

    def backend(self, addresses: list[str]) -> int:
        err = _err()
        index = int(lib.gw_config_backend(self._h, " ".join(addresses).encode(), err, _ERRLEN))
        if index < 0:
            raise DataplaneError(_text(err))
        return index

    def route(self, entry: RouteEntry) -> None:
        headers = "".join(f"{k.lower()}\n{v}\n" for k, v in entry.headers)
        # The char arrays must outlive the call: a struct field does not keep its pointee alive.
        text = {
            name: ffi.new("char[]", value.encode())
            for name, value in (
                ("hostname", entry.hostname.lower()),
                ("path", entry.path),
                ("headers", headers),
                ("method", entry.method),
                ("name", entry.name),
            )
        }
        spec = ffi.new(
            "gw_route_spec *",
            {
                **text,
                "listener_id": entry.listener_id,
                "path_exact": int(entry.path_exact),
                "backend": entry.backend,
                "waf": entry.waf.handle if entry.waf else ffi.NULL,
                "waf_mode": entry.waf_mode,
                "max_body": entry.max_body,
                "stat_slot": entry.stat_slot,
            },
        )
        self._keep.append(entry.waf)
        err = _err()
        if lib.gw_config_route(self._h, spec, err, _ERRLEN) < 0:
            raise DataplaneError(f"route {entry.name}: {_text(err)}")


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout_ms: int = 10_000
    body_timeout_ms: int = 30_000
    idle_timeout_ms: int = 60_000
    upstream_timeout_ms: int = 30_000
    max_connections: int = 10_000
    event_queue: int = 4096


@dataclass(frozen=True)
class WafEvent:
    action: str
    status: int
    stat_slot: int
    score: int
    nrules: int
    request_id: str
    route: str
    client: str
    host: str
    method: str
    uri: str
    rules: tuple[RuleMatch, ...]
    detail: str


@dataclass(frozen=True)
class UpstreamRequest:
    """A request waits for a connection to an external backend: answer with Gateway.upstream_ready."""

    provider: int
    token: int
    request_id: str
    client: str


def _event(r: Any) -> WafEvent | UpstreamRequest:
    if r.kind == lib.GW_EVENT_UPSTREAM:
        return UpstreamRequest(int(r.provider), int(r.token), _text(r.request_id), _text(r.client))
    return WafEvent(
        ACTIONS[r.action],
        r.status,
        r.stat_slot,
        r.score,
        r.nrules,
        _text(r.request_id),
        _text(r.route),
        _text(r.client),
        _text(r.host),
        _text(r.method),
        _text(r.uri),
        _matches(_text(r.rules)),
        _text(r.detail),
    )


class Gateway:
    """The C data plane: `listen()` sockets, `apply()` a config, `start()`, drain `events()`, `stop()`."""

    def __init__(self, threads: int = 1, limits: Limits | None = None) -> None:
        lim = limits or Limits()
        c_limits = ffi.new("gw_limits *", lim.__dict__)
        err = _err()
        handle = lib.gw_new(threads, c_limits, err, _ERRLEN)
        if handle == ffi.NULL:
            raise DataplaneError(_text(err))
        self._h: Any = handle
        self._lock = threading.Lock()
        self._config: Config | None = None
        self._evbuf = ffi.new("gw_event[]", 64)

    def _handle(self) -> Any:
        if self._h is None:
            raise DataplaneError("gateway is stopped")
        return self._h

    def listen(self, fd: int, listener_id: int) -> None:
        err = _err()
        if lib.gw_listen(self._handle(), fd, listener_id, err, _ERRLEN) < 0:
            raise DataplaneError(_text(err))

    def apply(self, config: Config) -> None:
        lib.gw_apply(self._handle(), config.handle)
        self._config = config  # C holds its own reference; this keeps the Python-side objects alive

    def start(self) -> None:
        err = _err()
        if lib.gw_start(self._handle(), err, _ERRLEN) < 0:
            raise DataplaneError(_text(err))

    def stop(self) -> None:
        with self._lock:
            if self._h is not None:
                lib.gw_stop(self._h)
                self._h = None

    @property
    def eventfd(self) -> int:
        return int(lib.gw_eventfd(self._handle()))

    def events(self) -> list[WafEvent | UpstreamRequest]:
        out: list[WafEvent | UpstreamRequest] = []
        while True:
            n = int(lib.gw_events(self._handle(), self._evbuf, 64))
            out.extend(_event(self._evbuf[i]) for i in range(max(n, 0)))
            if n < 64:
                return out

    def upstream_ready(self, token: int, fd: int) -> None:
        """Hands the connected `fd` (-1: failed, the client gets 502) to the waiting request; C owns it."""
        lib.gw_upstream_ready(self._handle(), token, fd)

    def counters(self) -> dict[str, int]:
        names: list[str] = []
        while (name := lib.gw_counter_name(len(names))) != ffi.NULL:
            names.append(_text(name))
        values = ffi.new("uint64_t[]", len(names))
        lib.gw_counters(self._handle(), values, len(names))
        return {n: int(values[i]) for i, n in enumerate(names)}

    def route_stats(self, slot: int) -> dict[str, int]:
        values = ffi.new("uint64_t[]", len(ACTIONS))
        lib.gw_route_stats(self._handle(), slot, values)
        return {a: int(values[i]) for i, a in enumerate(ACTIONS)}

    def __del__(self) -> None:
        self.stop()
