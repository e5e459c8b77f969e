"""Audit log: what changed the node's security posture (config applied, DENY/AUDIT decisions, CSRs).

One JSON line per event, secrets redacted (api.jsonlog); used by the agent and the management plane.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from api.jsonlog import JsonLog, utc_iso

_RESERVED = frozenset({"time", "event"})


class AuditLog:
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
