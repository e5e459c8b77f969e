from agent.proxy.pool import Pool

SRC, DST = "spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/web"
KEY = (SRC, "10.244.1.2", DST, "10.244.2.3")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reuses_a_connection_until_full_then_opens_another() -> None:
    pool = Pool(max_streams=2, idle_timeout=10)
    assert pool.acquire(KEY, 1) is None
    first = pool.add(KEY, 7, "172.30.0.2:15008", 1)
    assert first.streams == 1
    assert pool.acquire(KEY, 1) is first
    assert first.streams == 2
    assert pool.acquire(KEY, 1) is None  # full
    second = pool.add(KEY, 8, "172.30.0.2:15008", 1)
    assert second.streams == 1
    pool.release(7)
    assert pool.acquire(KEY, 1) is first


def test_keys_never_share_connections() -> None:
    pool = Pool()
    pool.add(KEY, 1, "p", 1)
    # any of source identity, source pod, destination identity (a reused pod IP) or destination pod
    assert pool.acquire(("spiffe://td/ns/b/sa/y", "10.244.1.2", DST, "10.244.2.3"), 1) is None
    assert pool.acquire((SRC, "10.244.1.9", DST, "10.244.2.3"), 1) is None
    assert pool.acquire((SRC, "10.244.1.2", "spiffe://td/ns/c/sa/new", "10.244.2.3"), 1) is None
    assert pool.acquire((SRC, "10.244.1.2", DST, "10.244.2.4"), 1) is None
    assert pool.acquire(KEY, 1) is not None


def test_prefers_handshaken_connection() -> None:
    pool = Pool(max_streams=10)
    pool.add(KEY, 1, "p", 1)
    pool.add(KEY, 2, "p", 1)
    pool.handshake_done(2, "TLSv1.3", "TLS_AES_256_GCM_SHA384", "ab")
    conn = pool.acquire(KEY, 1)
    assert conn is not None and conn.conn_id == 2 and conn.tls_version == "TLSv1.3"


def test_rotated_certificate_drains_old_connections() -> None:
    pool = Pool()
    old = pool.add(KEY, 1, "p", 1)
    assert pool.acquire(KEY, 2) is None
    assert old.draining
    pool.release(1)
    pool.release(1)
    assert pool.expired() == [1]
    assert pool.expired() == []  # handed back once


def test_idle_connections_expire_and_removal_forgets() -> None:
    clock = Clock()
    pool = Pool(idle_timeout=30, clock=clock)
    pool.add(KEY, 1, "p", 1)
    clock.now += 60
    assert pool.expired() == []  # still carries its stream
    pool.release(1)
    clock.now += 29
    assert pool.expired() == []
    clock.now += 2
    assert pool.expired() == [1]
    assert pool.acquire(KEY, 1) is None  # closing: no new streams
    assert pool.remove(1) is not None
    assert pool.remove(1) is None
    assert pool.connections() == []


def test_rows() -> None:
    pool = Pool()
    pool.add(KEY, 3, "172.30.0.2:15008", 1)
    (row,) = pool.rows()
    assert row["conn_id"] == 3 and row["state"] == "handshaking" and row["streams"] == 1


def test_busy_key_spreads_over_connections_then_shares_the_least_busy() -> None:
    pool = Pool(max_streams=100, spread=3)
    first = pool.add(KEY, 1, "p", 1)
    assert pool.acquire(KEY, 1) is None  # first is busy, the key may have 3: open another
    second = pool.add(KEY, 2, "p", 1)
    assert pool.acquire(KEY, 1) is None
    third = pool.add(KEY, 3, "p", 1)
    got = [pool.acquire(KEY, 1) for _ in range(3)]  # at the cap: least busy first
    assert sorted(c.conn_id for c in got if c) == [1, 2, 3]
    pool.release(2)
    pool.release(2)
    assert second.streams == 0
    assert pool.acquire(KEY, 1) is second  # an idle connection is reused before opening more
    assert (first.streams, second.streams, third.streams) == (2, 1, 2)


def test_idle_key_keeps_one_connection() -> None:
    pool = Pool(spread=4)
    conn = pool.add(KEY, 1, "p", 1)
    for _ in range(5):  # one stream after another: never more than one connection
        pool.release(1)
        assert pool.acquire(KEY, 1) is conn


PEER = "10.244.2.3:15008"


def test_a_destination_that_changed_gets_new_connections_and_the_old_ones_drain() -> None:
    pool = Pool(max_streams=10)
    old = pool.add(KEY, 1, PEER, 1, DST)
    assert pool.acquire(KEY, 1, PEER, DST) is old
    # The address now needs another identity: the old connection takes no new stream, and closes once idle.
    assert pool.acquire(KEY, 1, PEER, "spiffe://td/ns/c/sa/new") is None
    assert old.draining and pool.drained_moved == 1
    assert pool.expired() == []  # still carries its two streams
    pool.release(1)
    pool.release(1)
    assert pool.expired() == [1]


def test_drain_moved_follows_the_config_without_waiting_for_a_stream() -> None:
    pool = Pool()
    keys = [(SRC, "10.244.1.2", DST, f"10.244.2.{i}") for i in (3, 4, 5)]
    renamed = pool.add(keys[0], 1, "10.244.2.3:15008", 1, DST)
    gone = pool.add(keys[1], 2, "10.244.2.4:15008", 1, DST)
    same = pool.add(keys[2], 3, "10.244.2.5:15008", 1, DST)
    now = {
        keys[0]: ("10.244.2.3:15008", "spiffe://td/ns/c/sa/new"),  # the address holds another identity
        keys[2]: ("10.244.2.5:15008", DST),
    }
    assert pool.drain_moved(now.get) == 2
    assert (renamed.draining, gone.draining, same.draining) == (True, True, False)
    assert pool.drain_moved(now.get) == 0  # counted once


def test_a_drained_connection_takes_no_new_stream_and_closes_once_idle() -> None:
    pool = Pool(max_streams=10)
    conn = pool.add(KEY, 1, PEER, 1, DST)
    assert pool.drain(1) and not pool.drain(1)  # the peer's GOAWAY, once
    assert pool.acquire(KEY, 1, PEER, DST) is None  # a new connection instead
    assert pool.expired() == []  # its stream still runs
    pool.release(1)
    assert pool.expired() == [1] and conn.closing
    assert not pool.drain(99)


def test_a_key_keeps_only_spread_idle_connections_after_a_burst() -> None:
    clock = Clock()
    pool = Pool(max_streams=1, idle_timeout=60, spread=2, clock=clock)
    for conn_id in range(1, 6):  # a burst: five concurrent streams, one connection each
        pool.add(KEY, conn_id, "p", 1)
    for conn_id in range(1, 5):
        clock.now += 1
        pool.release(conn_id)
    # Four idle, one busy: the two most recently used idle ones stay warm, the others close now.
    assert sorted(pool.expired()) == [1, 2]
    assert pool.expired() == []
    pool.release(5)
    assert pool.expired() == [3]  # 5 and 4 are the two warm ones now
