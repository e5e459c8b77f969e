"""The process log (stderr) of the agent and the plane: text for people, JSON lines on request.

`--log-format json` gives one object per record, as ztunnel's JSON logs: `time` (RFC 3339 UTC), `level`,
`scope` (the logger), `msg`, any structured `extra=` fields a call site passes (e.g. `event`, `node`,
`version`), and `error` with the traceback when there is one. Values pass through api.jsonlog.redact, so
a key or token cannot reach the log through a message argument either.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from api.jsonlog import redact, utc_iso

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra=` and is kept.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": utc_iso(record.created),
            "level": record.levelname.lower(),
            "scope": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(redact(out), ensure_ascii=False, default=str)


def configure(level: str, fmt: str = "text") -> None:
    """Root logging to stderr in `fmt` (replacing handlers set before, as basicConfig(force=True))."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (choose {', '.join(FORMATS)})")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
