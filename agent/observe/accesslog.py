"""Access log: one JSON line per proxied connection when it closes (optionally one more when it opens).

A line is assembled from encoded parts: what one connection shares with the others of its pair (addresses,
identities, TLS facts) is redacted and encoded once and cached, the per-connection fields (id, source port,
times, bytes, flags) are formatted in; the line is the same JSON object `JsonLog.write` would write for
the whole record, in the same field order.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agent.connections import ConnectionClose, ConnectionRecord
from api.jsonlog import JsonLog, encode, utc_iso

PARTS_CACHE_MAX = 4096  # distinct (pair, identities, TLS facts) whose encoded parts are kept; then cleared

ENDS_CACHE_MAX = 256  # distinct (response flags, error) texts kept encoded
_Parts = tuple[str, str]  # encoded members around source_port: '"direction":...,"source_ip":...', the rest


def _record_fields(record: ConnectionRecord) -> dict[str, Any]:
    return {
        "conn_id": record.conn_id,
        "direction": record.direction.value,
        "source_ip": record.source_ip,
        "source_port": record.source_port,
        "destination_ip": record.destination_ip,
        "destination_port": record.destination_port,
        "source_workload": record.source_workload,
        "destination_workload": record.destination_workload,
        "source_principal": record.source_principal,
        "destination_principal": record.destination_principal,
        "connection_security_policy": record.security_policy,
        "policy": record.policy,
        "tls_version": record.tls_version,
        "tls_cipher": record.tls_cipher,
        "peer_cert_sha256": record.peer_cert_sha256,
    }


def _members(fields: dict[str, Any]) -> str:
    """The encoded members of `fields`, without the braces (redacted by `encode`)."""
    return encode(fields)[1:-1]


def _parts(record: ConnectionRecord) -> _Parts:
    fields = _record_fields(record)
    del fields["conn_id"]
    names = list(fields)
    cut = names.index("source_port")
    return (
        _members({n: fields[n] for n in names[:cut]}),
        _members({n: fields[n] for n in names[cut + 1 :]}),
    )


class AccessLog:
    """ConnectionObserver writing JSON lines to `path` (rotating, see api.jsonlog.JsonLog)."""

    def __init__(
        self, path: str | Path, log_start: bool = False, max_bytes: int = 50 * 1024 * 1024, backups: int = 3
    ) -> None:
        self.log_start = log_start
        self._log = JsonLog(path, max_bytes=max_bytes, backups=backups, deferrable=True)
        self._parts_cache: dict[tuple[Any, ...], _Parts] = {}
        self._ends_cache: dict[tuple[str, str], str] = {}  # (flags, error) -> their encoded members

    @property
    def path(self) -> Path:
        return self._log.path

    def _shared(self, r: ConnectionRecord) -> _Parts:
        # Every field _parts encodes (all but conn_id and source_port).
        key = (
            r.direction, r.source_ip, r.destination_ip, r.destination_port, r.source_workload,
            r.destination_workload, r.source_principal, r.destination_principal, r.security_policy, r.policy,
            r.tls_version, r.tls_cipher, r.peer_cert_sha256,
        )  # fmt: skip
        found = self._parts_cache.get(key)
        if found is None:
            if len(self._parts_cache) >= PARTS_CACHE_MAX:
                self._parts_cache.clear()
            found = self._parts_cache[key] = _parts(r)
        return found

    def _record(self, r: ConnectionRecord) -> str:
        head, tail = self._shared(r)
        return f'"conn_id":{int(r.conn_id)},{head},"source_port":{int(r.source_port)},{tail}'

    def opened(self, record: ConnectionRecord) -> None:
        if self.log_start:
            start = record.start_time or time.time()
            self._log.write_encoded(f'{{"event":"open","start":"{utc_iso(start)}",{self._record(record)}}}')

    def closed(self, close: ConnectionClose) -> None:
        record = close.record
        end = time.time()
        start = record.start_time or end - close.duration_s
        flags, error = close.response_flags, close.error
        # Why policy refused it (the same text the audit log records), so one file tells the story.
        deny_reason = error if flags == "DENY" else ""
        ends = self._ends_cache.get((flags, error))
        if ends is None:
            if len(self._ends_cache) >= ENDS_CACHE_MAX:
                self._ends_cache.clear()
            ends = _members({"response_flags": flags, "deny_reason": deny_reason, "error": error})
            self._ends_cache[(flags, error)] = ends
        self._log.write_encoded(
            f'{{"event":"close","start":"{utc_iso(start)}","end":"{utc_iso(end)}",'
            f'"duration_ms":{float(round(close.duration_s * 1000, 3))!r},{self._record(record)},'
            f'"bytes_sent":{int(close.bytes_sent)},"bytes_received":{int(close.bytes_received)},{ends}}}'
        )

    def close(self) -> None:
        self._log.close()
