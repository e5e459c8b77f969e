"""Rate-limited logging for repeated warnings: one line per key per interval, saying how many were dropped.

Under attack (a flood of refused handshakes, an fd limit, a relay outage) the same warning fires thousands of
times a second; a text log that writes every one costs more than the refusal itself and buries everything
else. Counters (metrics) keep the exact numbers; the log keeps the first occurrence and a tally.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_INTERVAL = 10.0
MAX_KEYS = 1024  # keys are a handful of fixed names; the bound only guards against a caller's mistake


@dataclass
class _Slot:
    next_at: float
    dropped: int = 0


@dataclass
class RateLimitedLog:
    logger: logging.Logger
    interval: float = DEFAULT_INTERVAL
    clock: Callable[[], float] = time.monotonic
    _slots: dict[str, _Slot] = field(default_factory=dict)
    dropped_total: int = 0

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log `msg % args` unless `key` was logged less than `interval` ago; True when it was written."""
        now = self.clock()
        slot = self._slots.get(key)
        if slot is not None and now < slot.next_at:
            slot.dropped += 1
            self.dropped_total += 1
            return False
        if slot is None and len(self._slots) >= MAX_KEYS:
            self._slots.clear()
        dropped = slot.dropped if slot is not None else 0
        self._slots[key] = _Slot(now + self.interval)
        if dropped:
            self.logger.log(
                level, msg + " (%d more like this in the last %.0f s)", *args, dropped, self.interval
            )
        else:
            self.logger.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)
