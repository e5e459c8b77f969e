"""The proxy's text log: per-connection lines at DEBUG (the access log records connections), repeated
warnings at most once per interval with a tally."""

from __future__ import annotations

import logging

import pytest

from agent.connections import ConnectionClose, ConnectionRecord, Direction
from agent.proxy.lograte import RateLimitedLog
from agent.proxy.table import ConnectionTable, Entry, Path


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class _Observer:
    def opened(self, record: ConnectionRecord) -> None:
        pass

    def closed(self, close: ConnectionClose) -> None:
        pass


def test_a_connection_close_is_not_an_info_line(caplog: pytest.LogCaptureFixture) -> None:
    table = ConnectionTable(_Observer())
    record = ConnectionRecord(0, Direction.OUTBOUND, "10.244.1.2", 1234, "10.244.2.2", 8080)
    caplog.set_level(logging.INFO, logger="ambit.proxy")
    table.finish(table.add(Entry(table.next_tag(), record, Path.SPLICE)).tag)
    assert [r for r in caplog.records if r.name == "ambit.proxy"] == []
    caplog.set_level(logging.DEBUG, logger="ambit.proxy")
    table.finish(table.add(Entry(table.next_tag(), record, Path.SPLICE)).tag)
    assert [r.levelno for r in caplog.records if r.name == "ambit.proxy"] == [logging.DEBUG]


def test_repeated_warnings_are_one_line_per_interval_with_a_tally(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    warn = RateLimitedLog(logging.getLogger("ambit.test"), interval=10.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="ambit.test")
    for _ in range(1000):
        warn.warning("emfile", "accept failed: %s", "Too many open files")
    warn.warning("other", "another kind: %d", 1)  # keys are independent
    clock.now = 10.0
    warn.warning("emfile", "accept failed: %s", "Too many open files")
    lines = [r.getMessage() for r in caplog.records if r.name == "ambit.test"]
    assert lines == [
        "accept failed: Too many open files",
        "another kind: 1",
        "accept failed: Too many open files (999 more like this in the last 10 s)",
    ]
    assert warn.dropped_total == 999
