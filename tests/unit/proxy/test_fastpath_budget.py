"""The fast path's bookkeeping against a real engine table (agent/proxy/fastpath.py): credits reserve the
source's budget and come back when entries go, the table bound and stale generations are respected."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from agent.connections import ConnectionClose, ConnectionRecord, Direction
from agent.policy.decision import ConnectionAttrs, Decision
from agent.proxy.fastpath import FastPath, Route
from agent.proxy.limits import Budgets, Limits
from agent.proxy.loop import ControlLoop
from agent.proxy.pool import Pool, PooledConnection
from agent.proxy.runtime import Runtime
from agent.proxy.table import ConnectionTable
from agent.proxy.tls import TlsContexts
from agent.state import MeshSnapshot
from api.resources.workload import Workload
from api.spiffe import SpiffeId
from native.engine import Engine

TD = "cluster.local"
SRC, DST = SpiffeId.workload(TD, "app", "a"), SpiffeId.workload(TD, "app", "b")
LIMIT = 10


class _Records:
    def opened(self, record: ConnectionRecord) -> None: ...

    def closed(self, close: ConnectionClose) -> None: ...


class _Deny:
    def authorize(self, attrs: ConnectionAttrs) -> Decision:
        return Decision(False, "", "not used")

    def mtls_mode(self, workload: Workload, port: int) -> str:
        return "STRICT"


class _NoCredentials:
    def svid_for(self, spiffe_id: SpiffeId) -> object:
        raise LookupError("no SVIDs here")

    def trust_bundle_pem(self) -> bytes:
        return b""


@pytest.fixture
def rt() -> Iterator[Runtime]:
    engine = Engine(threads=1)
    engine.start()
    snap = MeshSnapshot(node="node-1")
    yield Runtime(
        node="node-1", state=lambda: snap, authorizer=_Deny(), engine=engine, loop=ControlLoop(),
        table=ConnectionTable(_Records()), pool=Pool(), tls=TlsContexts(engine, _NoCredentials()),  # type: ignore[arg-type]
        preserve_source_ip=True, budgets=Budgets(Limits(outbound_connections_per_source=LIMIT)),
    )  # fmt: skip
    engine.stop()


def _fast(rt: Runtime, capacity: int = 8) -> FastPath:
    fast = FastPath(rt, lambda sock: sock.close(), capacity=capacity, credits=8)
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    fast.start(lst.detach())
    return fast


def _route(fast: FastPath, dst_ip: str = "10.244.2.2", generation: int | None = None) -> Route:
    key = (str(SRC), "10.244.1.2", str(DST), dst_ip)
    record = ConnectionRecord(0, Direction.OUTBOUND, "10.244.1.2", 40000, dst_ip, 8080, str(SRC), str(DST))
    gen = fast.generation() if generation is None else generation
    return Route(("10.244.1.2", dst_ip, 8080), key, SRC, 1, gen, record, f"{dst_ip}:8080", "k=v")


def _ready(rt: Runtime, route: Route, conn_id: int) -> PooledConnection:
    conn = rt.pool.add(route.pool_key, conn_id, f"{route.key[1]}:15008", 1, str(DST))
    rt.pool.release(conn_id)
    conn.ready = True
    return conn


def test_credits_reserve_the_budget_and_come_back(rt: Runtime) -> None:
    fast = _fast(rt)
    route = _route(fast)
    fast.offer(route, _ready(rt, route, 101))
    budget = rt.budgets.outbound_sources
    assert len(fast) == 1 and budget.held("10.244.1.2") == LIMIT // 2  # at most half of what is left
    assert rt.engine.counters()["fastpath_entries"] == 1
    fast.forget_conn(101)  # the pooled connection drained: the entry goes, its units come back
    assert len(fast) == 0 and budget.held("10.244.1.2") == 0
    assert rt.engine.counters()["fastpath_entries"] == 0


def test_no_entry_for_a_source_at_its_budget(rt: Runtime) -> None:
    fast = _fast(rt)
    for _ in range(LIMIT - 1):
        rt.budgets.outbound_sources.take("10.244.1.2")
    route = _route(fast)
    fast.offer(route, _ready(rt, route, 101))
    assert len(fast) == 0  # every new connection of it is checked the ordinary way


def test_table_bound_and_stale_generation(rt: Runtime) -> None:
    fast = _fast(rt, capacity=1)
    first, second = _route(fast, "10.244.2.2"), _route(fast, "10.244.2.3")
    fast.offer(first, _ready(rt, first, 101))
    fast.offer(second, _ready(rt, second, 102))
    assert len(fast) == 1 and rt.counters["fastpath_table_full"] == 1
    stale = fast.generation()
    fast.invalidate()
    fast.clear()
    fast.offer(_route(fast, generation=stale), rt.pool.get(101))  # type: ignore[arg-type]
    assert len(fast) == 0 and rt.counters["fastpath_install_refused"] == 1
    assert rt.budgets.outbound_sources.held("10.244.1.2") == 0


def test_a_spent_budget_takes_back_the_unused_credits(rt: Runtime) -> None:
    """A pod below its limit is never refused for the fast path's reservation: when its budget is spent,
    the credits its entries hold unused come back (the entries go; the next routed connection reinstalls)."""
    fast = _fast(rt)
    route = _route(fast)
    fast.offer(route, _ready(rt, route, 101))
    budget = rt.budgets.outbound_sources
    reserved = budget.held("10.244.1.2")
    for _ in range(LIMIT - reserved):  # connections of the ordinary path fill the rest
        budget.take("10.244.1.2")
    assert budget.full("10.244.1.2")
    assert fast.reclaim("10.244.1.2") == reserved
    assert len(fast) == 0 and not budget.full("10.244.1.2")
    assert budget.held("10.244.1.2") == LIMIT - reserved and rt.counters["fastpath_reclaimed"] == reserved
    assert rt.engine.counters()["fastpath_entries"] == 0
    assert fast.reclaim("10.244.1.2") == 0  # nothing reserved any more


def test_an_unlimited_budget_still_gets_entries(rt: Runtime) -> None:
    """`outbound_connections_per_source=0` is unlimited: entries get all their credits (before, credits were
    computed from a limit of 0, came out negative and the fast path never installed an entry)."""
    rt.budgets.outbound_sources.limit = 0
    fast = _fast(rt)
    route = _route(fast)
    fast.offer(route, _ready(rt, route, 101))
    assert len(fast) == 1 and rt.engine.counters()["fastpath_entries"] == 1
    assert rt.budgets.outbound_sources.held("10.244.1.2") == 8  # all its credits, still accounted
