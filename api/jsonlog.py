"""JSON-lines logs that rotate by size and never hold a secret; shared by the agent and the management plane.

Every record passes through `redact()` first, so a caller that hands over a whole object (a config
snapshot, an SVID row, an exception text) cannot leak a private key or a token into a file or an HTTP
answer. `redact()` is also what the admin API runs its answers through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Protocol

log = logging.getLogger(__name__)

REDACTED = "<redacted>"

# Field names that carry secrets. A bare "key" is NOT one: Istio conditions (`when: [{key: source.ip}]`)
# and label selectors use it for attribute names, which an operator needs to see; key material under such
# a name is still caught by the value scan below.
_SECRET_NAME = re.compile(
    r"(token|secret|passw(or)?d|credential|private|(^|[_\-.])key[_\-.]?pem|.+key$|^key[_\-.])",
    re.IGNORECASE,
)
# Names matched above that are known to be public.
_PUBLIC_NAMES = frozenset({"public_key", "publickey", "label_key"})
# A PEM private key block of any algorithm (PKCS#1 "RSA", SEC1 "EC", PKCS#8, "ENCRYPTED"); an unterminated
# block (truncated text) is cut to the end of the string.
_PEM_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|\Z)", re.DOTALL
)
_KEY_MARKER = "PRIVATE KEY"


@functools.lru_cache(maxsize=4096)
def secret_name(name: str) -> bool:
    """True when a field called `name` holds secret material (its value is never shown). Cached: records
    repeat the same few field names (an access log line: 25 of them, 21 regex searches uncached)."""
    return name.lower() not in _PUBLIC_NAMES and bool(_SECRET_NAME.search(name))


def redact_text(text: str) -> str:
    if _KEY_MARKER not in text:
        return text
    text = _PEM_KEY.sub(REDACTED, text)
    # A marker left outside a well-formed block means mangled key text: drop the whole value.
    return REDACTED if _KEY_MARKER in text else text


def redact(value: Any) -> Any:
    """A JSON-ready copy of `value` with secrets replaced by "<redacted>".

    Handles mappings, sequences, sets, dataclasses, enums, bytes, paths and datetimes; anything else is
    shown as its str() (scanned too).
    """
    return _redact(value, 0)


_MAX_DEPTH = 64


def _redact(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return "<too deep>"
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return redact_text(bytes(value).decode("utf-8", errors="replace"))
    if isinstance(value, enum.Enum):
        return _redact(value.value, depth + 1)
    if type(value) is dict:
        return _redact_dict(value, depth)
    if isinstance(value, Mapping):
        return {str(k): _field(str(k), v, depth) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _field(f.name, getattr(value, f.name), depth) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_redact(v, depth + 1) for v in items]
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return redact_text(str(value))


def _redact_dict(value: dict[Any, Any], depth: int) -> dict[str, Any]:
    """`_field` for each item, with its common cases (text and numbers: every field of a log record)
    inline: one access log record is 25 of them."""
    out: dict[str, Any] = {}
    for k, v in value.items():
        name = k if type(k) is str else str(k)
        kind = type(v)
        if v is None or kind is int or kind is float or kind is bool:
            out[name] = v
        elif kind is str:
            out[name] = REDACTED if v and secret_name(name) else redact_text(v)
        else:
            out[name] = _field(name, v, depth)
    return out


def _field(name: str, value: Any, depth: int) -> Any:
    if value not in (None, "", b"") and secret_name(name) and not isinstance(value, bool | int | float):
        return REDACTED
    return _redact(value, depth + 1)


# Formatted seconds: a burst of records (an access log line has a start and an end) shares a few.
_SECONDS: dict[int, str] = {}
_SECONDS_MAX = 64


def utc_iso(ts: float) -> str:
    """RFC 3339 UTC with milliseconds, the timestamp format of every log record."""
    ms = int(ts * 1000)  # floor, as datetime's microsecond // 1000; time.strftime is ~3x cheaper
    second = ms // 1000
    prefix = _SECONDS.get(second)
    if prefix is None:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        if len(_SECONDS) >= _SECONDS_MAX:
            _SECONDS.clear()  # a racing thread at worst formats its second again
        _SECONDS[second] = prefix
    return f"{prefix}{ms % 1000:03d}Z"


# One encoder for every line (json.dumps with options builds a new one per call); it holds no state.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_batching = threading.local()  # .sinks: what this thread's `batched()` block flushes at its end


class _Sink(Protocol):
    def flush(self) -> None: ...


class batched:  # noqa: N801 (used as a function: `with batched():`)
    """Within this block, this thread's writes to deferrable JsonLogs (access logs) are flushed once at
    its end instead of once per record: one write(2) per event drain, not per connection. Lines stay in
    the process (the file object's buffer) only until the block ends; audit logs are never deferred.
    Other sinks (the connection metrics) defer their updates the same way (`defer`). A class, not a
    generator context manager: the proxy enters one per event drain."""

    __slots__ = ("_outer",)

    def __enter__(self) -> None:
        self._outer = getattr(_batching, "sinks", None) is not None  # nested: the outer block flushes
        if not self._outer:
            _batching.sinks = set()

    def __exit__(self, *exc: object) -> None:
        if self._outer:
            return
        sinks, _batching.sinks = _batching.sinks, None
        for one in sinks:
            one.flush()


def defer(sink: _Sink) -> bool:
    """Inside this thread's `batched()` block: `sink.flush()` runs once at its end (however often this is
    called) and True is returned; outside one False (the caller applies its update at once)."""
    sinks: set[_Sink] | None = getattr(_batching, "sinks", None)
    if sinks is None:
        return False
    sinks.add(sink)
    return True


def encode(value: Any) -> str:
    """`value` redacted and encoded as compact JSON, as `JsonLog.write` writes it."""
    return _ENCODER.encode(redact(value))


class JsonLog:
    """Appends one JSON object per line to `path`; thread-safe; rotates to path.1..path.N by size.

    A failing disk never breaks the caller: write errors are counted (`.errors`) and logged once per
    burst, and the record is dropped. `deferrable`: a write inside `batched()` is flushed at its end.
    """

    def __init__(
        self, path: str | Path, max_bytes: int = 50 * 1024 * 1024, backups: int = 3, deferrable: bool = False
    ) -> None:
        if max_bytes <= 0 or backups < 0:
            raise ValueError("max_bytes must be > 0 and backups >= 0")
        self.path = Path(path)
        self.deferrable = deferrable
        self.max_bytes = max_bytes
        self.backups = backups
        self.records = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._out: IO[str] | None = None
        self._size = 0
        self._failing = False

    def write(self, record: Mapping[str, Any]) -> None:
        self.write_encoded(encode(record))

    def write_encoded(self, text: str) -> None:
        """Append one line already encoded as a JSON object by `encode()` (so redacted): for writers that
        assemble their lines from encoded parts they cache (the access log, per connection)."""
        line = text + "\n"
        size = len(line) if line.isascii() else len(line.encode("utf-8"))
        with self._lock:
            try:
                out = self._open()
                if self._size and self._size + size > self.max_bytes:
                    out = self._rotate()
                out.write(line)
                if not (self.deferrable and defer(self)):
                    out.flush()
                self._size += size
                self.records += 1
                self._failing = False
            except OSError as exc:
                self._failed(exc)

    def flush(self) -> None:
        """Write out what `batched()` deferred (a failure: counted and logged as a failed write)."""
        with self._lock:
            if self._out is None:
                return
            try:
                self._out.flush()
            except OSError as exc:
                self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        self.errors += 1
        self._close()
        if not self._failing:
            log.error("cannot write log %s: %s (records dropped until it recovers)", self.path, exc)
        self._failing = True

    def close(self) -> None:
        with self._lock:
            self._close()

    def _open(self) -> IO[str]:
        if self._out is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._out = os.fdopen(fd, "a", encoding="utf-8")
            self._size = os.fstat(fd).st_size
        return self._out

    def _rotate(self) -> IO[str]:
        self._close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        return self._open()

    def _close(self) -> None:
        if self._out is not None:
            with contextlib.suppress(OSError):
                self._out.close()
            self._out = None
            self._size = 0


_RESERVED = frozenset({"time", "event"})


class AuditLog:
    """What changed a node's or the plane's security posture: config versions applied, DENY/AUDIT
    decisions, joins and CSRs issued or refused. One JSON line per event, redacted like every JsonLog."""

    def __init__(self, path: str | Path, max_bytes: int = 50 * 1024 * 1024, backups: int = 5) -> None:
        self._log = JsonLog(path, max_bytes=max_bytes, backups=backups)

    @property
    def path(self) -> Path:
        return self._log.path

    def record(self, event: str, /, **fields: Any) -> None:
        """Append `event` with `fields`, e.g. record("config_applied", version=7) or
        record("decision", action="DENY", policy="ns/p", source_principal="spiffe://...").

        A field named like a reserved key ("time", "event") is kept with a trailing "_", so a caller
        passing its own record dict through cannot overwrite when or what was recorded.
        """
        entry: dict[str, Any] = {"time": utc_iso(time.time()), "event": event}
        for name, value in fields.items():
            entry[f"{name}_" if name in _RESERVED else name] = value
        self._log.write(entry)

    def close(self) -> None:
        self._log.close()
