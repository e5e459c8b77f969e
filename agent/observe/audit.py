"""Audit log: what changed the node's security posture (config applied, DENY/AUDIT decisions, CSRs).

One JSON line per event, secrets redacted (api.jsonlog); used by the agent and the management plane.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from api.jsonlog import JsonLog, utc_iso


class AuditLog:
    def __init__(self, path: str | Path, max_bytes: int = 50 * 1024 * 1024, backups: int = 5) -> None:
        self._log = JsonLog(path, max_bytes=max_bytes, backups=backups)

    @property
    def path(self) -> Path:
        return self._log.path

    def record(self, event: str, **fields: Any) -> None:
        """Append `event` with `fields`, e.g. record("config_applied", version=7) or
        record("policy_decision", action="DENY", policy="ns/p", source="spiffe://...")."""
        self._log.write({"time": utc_iso(time.time()), "event": event, **fields})

    def close(self) -> None:
        self._log.close()
