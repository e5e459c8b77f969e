"""One ConnectionObserver that feeds many: a failing observer never stops the others or the proxy."""

from __future__ import annotations

import logging
import threading

from agent.connections import ConnectionClose, ConnectionObserver, ConnectionRecord

log = logging.getLogger(__name__)


class FanOut:
    def __init__(self, *observers: ConnectionObserver) -> None:
        self.observers = observers
        self.errors: dict[str, int] = {}  # by observer class name
        self._lock = threading.Lock()

    def opened(self, record: ConnectionRecord) -> None:
        for observer in self.observers:
            try:
                observer.opened(record)
            except Exception:
                self._failed(observer, "opened")

    def closed(self, close: ConnectionClose) -> None:
        for observer in self.observers:
            try:
                observer.closed(close)
            except Exception:
                self._failed(observer, "closed")

    def _failed(self, observer: ConnectionObserver, call: str) -> None:
        name = type(observer).__name__
        with self._lock:
            count = self.errors.get(name, 0) + 1
            self.errors[name] = count
        # The first failure with its traceback, then one line per power of two so a broken observer
        # cannot flood the log from the proxy's hot path.
        if count == 1:
            log.exception("connection observer %s.%s failed", name, call)
        elif count & (count - 1) == 0:
            log.error("connection observer %s failed %d times", name, count)
