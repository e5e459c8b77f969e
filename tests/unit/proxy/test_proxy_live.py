"""The connections view's live counts (agent/proxy/live.py) against a real engine and a real table."""

from __future__ import annotations

import time

from agent.connections import ConnectionRecord, Direction
from agent.proxy import live
from agent.proxy.table import ConnectionTable, Entry, Path
from native.engine import Engine
from tests.unit.native.engine_testkit import tcp_pair
from tests.unit.proxy.test_proxy_table import Recorder


def _entry(table: ConnectionTable, path: Path, engine_conn: int = -1, reported: bool = True) -> Entry:
    record = ConnectionRecord(0, Direction.INBOUND, "10.244.1.2", 40000, "fd00::7", 8080)
    entry = table.add(Entry(table.next_tag(), record, path, engine_conn=engine_conn))
    if reported:
        table.established(entry)
    return entry


def _rows_until(engine: Engine, table: ConnectionTable, sent: int) -> dict[int, dict[str, object]]:
    deadline = time.monotonic() + 10
    while True:
        rows = {int(str(r["id"])): r for r in live.rows(engine, live.snapshot(table))}
        if any(r.get("bytes_sent") == sent for r in rows.values()) or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def test_live_counts_connecting_ended_and_stopped_engine() -> None:
    engine = Engine(threads=2)
    engine.start()
    table = ConnectionTable(Recorder())
    client, a = tcp_pair()
    b, server = tcp_pair()
    splice = _entry(table, Path.SPLICE, engine.splice(a.detach(), b.detach()))
    connecting = _entry(table, Path.HBONE_SERVER, reported=False)  # upstream connect still pending
    ended = _entry(table, Path.SPLICE, engine_conn=splice.engine_conn + 100)  # its close event in flight
    client.sendall(b"q" * 5000)
    got = b""
    while len(got) < 5000:
        got += server.recv(65536)
    server.sendall(b"r" * 12)
    rows = _rows_until(engine, table, 5000)
    assert (rows[splice.tag]["bytes_sent"], rows[splice.tag]["state"]) == (5000, "established")
    assert rows[splice.tag]["destination"] == "[fd00::7]:8080"
    # The client's 12 bytes from the destination may still be in flight: received grows to exactly 12.
    deadline = time.monotonic() + 10
    while rows[splice.tag]["bytes_received"] != 12 and time.monotonic() < deadline:
        rows = _rows_until(engine, table, 5000)
    assert rows[splice.tag]["bytes_received"] == 12
    assert (rows[connecting.tag]["state"], rows[connecting.tag]["bytes_sent"]) == ("connecting", 0)
    assert (rows[ended.tag]["state"], rows[ended.tag]["bytes_sent"]) == ("closing", None)
    engine.stop()
    # A stopped engine (or loops that do not answer) leaves the rows, without live counts.
    after = {int(str(r["id"])): r for r in live.rows(engine, live.snapshot(table))}
    assert after[splice.tag]["state"] == "established" and after[splice.tag]["bytes_sent"] is None
    client.close()
    server.close()
