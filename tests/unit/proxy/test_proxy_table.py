from agent.connections import ConnectionClose, ConnectionRecord, Direction
from agent.proxy.table import ConnectionTable, Entry, Path


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.opens: list[ConnectionRecord] = []
        self.closes: list[ConnectionClose] = []
        self.fail = fail

    def opened(self, record: ConnectionRecord) -> None:
        if self.fail:
            raise RuntimeError("observer bug")
        self.opens.append(record)

    def closed(self, close: ConnectionClose) -> None:
        self.closes.append(close)


def _record() -> ConnectionRecord:
    return ConnectionRecord(0, Direction.OUTBOUND, "10.244.1.2", 40000, "10.244.2.2", 8080)


def test_reported_once_opened_then_closed_with_bytes() -> None:
    obs = Recorder()
    table = ConnectionTable(obs)
    entry = table.add(Entry(table.next_tag(), _record(), Path.HBONE_CLIENT, engine_conn=5))
    table.update_record(entry, tls_version="TLSv1.3")
    table.established(entry)
    table.established(entry)
    assert [r.tls_version for r in obs.opens] == ["TLSv1.3"]
    assert [e.tag for e in table.on_engine_conn(5, Path.HBONE_CLIENT)] == [entry.tag]
    assert table.on_engine_conn(5, Path.HBONE_SERVER) == []
    assert table.rows()[0]["state"] == "established"
    table.finish(entry.tag, 10, 20)
    assert table.finish(entry.tag) is None
    (close,) = obs.closes
    assert (close.bytes_sent, close.bytes_received, close.response_flags) == (10, 20, "-")
    assert len(table) == 0


def test_rejected_connection_is_opened_and_closed_with_flags() -> None:
    obs = Recorder()
    table = ConnectionTable(obs)
    table.reject(_record(), "DENY", "policy ns/deny-all")
    assert len(obs.opens) == 1
    assert (obs.closes[0].response_flags, obs.closes[0].error) == ("DENY", "policy ns/deny-all")


def test_mark_wins_over_later_flags() -> None:
    obs = Recorder()
    table = ConnectionTable(obs)
    entry = table.add(Entry(table.next_tag(), _record(), Path.SPLICE))
    table.mark(entry, "DENY", "policy changed")
    table.finish(entry.tag, response_flags="UF", error="reset")
    assert (obs.closes[0].response_flags, obs.closes[0].error) == ("DENY", "policy changed")


def test_observer_errors_are_contained() -> None:
    obs = Recorder(fail=True)
    table = ConnectionTable(obs)
    table.reject(_record(), "NR", "x")
    assert table.observer_errors == 1
    assert len(obs.closes) == 1
