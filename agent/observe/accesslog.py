"""Access log: one JSON line per proxied connection when it closes (optionally one more when it opens)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agent.connections import ConnectionClose, ConnectionRecord
from api.jsonlog import JsonLog, utc_iso


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


class AccessLog:
    """ConnectionObserver writing JSON lines to `path` (rotating, see api.jsonlog.JsonLog)."""

    def __init__(
        self, path: str | Path, log_start: bool = False, max_bytes: int = 50 * 1024 * 1024, backups: int = 3
    ) -> None:
        self.log_start = log_start
        self._log = JsonLog(path, max_bytes=max_bytes, backups=backups, deferrable=True)

    @property
    def path(self) -> Path:
        return self._log.path

    def opened(self, record: ConnectionRecord) -> None:
        if self.log_start:
            start = record.start_time or time.time()
            self._log.write({"event": "open", "start": utc_iso(start), **_record_fields(record)})

    def closed(self, close: ConnectionClose) -> None:
        record = close.record
        end = time.time()
        start = record.start_time or end - close.duration_s
        self._log.write(
            {
                "event": "close",
                "start": utc_iso(start),
                "end": utc_iso(end),
                "duration_ms": round(close.duration_s * 1000, 3),
                **_record_fields(record),
                "bytes_sent": close.bytes_sent,
                "bytes_received": close.bytes_received,
                "response_flags": close.response_flags,
                # Why policy refused it (the same text the audit log records), so one file tells the story.
                "deny_reason": close.error if close.response_flags == "DENY" else "",
                "error": close.error,
            }
        )

    def close(self) -> None:
        self._log.close()
