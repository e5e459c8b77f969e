"""The inbound fast path's bookkeeping against a real engine table (agent/proxy/fastpath_in.py): what is
installed and what never is, credits reserve the peer's stream budget and come back when entries go, the
table bound, stale generations and snapshots, entries going with their connection."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from agent.connections import ConnectionClose, ConnectionRecord, Direction
from agent.policy.decision import ConnectionAttrs, Decision
from agent.proxy.fastpath_in import Allowed, InboundFastPath
from agent.proxy.limits import Budgets, Limits
from agent.proxy.loop import ControlLoop
from agent.proxy.pool import Pool
from agent.proxy.runtime import Runtime
from agent.proxy.table import ConnectionTable
from agent.proxy.tls import TlsContexts
from agent.state import MeshSnapshot
from api.resources.workload import Workload
from api.spiffe import SpiffeId
from native.engine import Engine, Event
from tests.unit.native.engine_testkit import Pki, make_pki

TD = "cluster.local"
SRC, DST = SpiffeId.workload(TD, "app", "a"), SpiffeId.workload(TD, "app", "b")
PEER = "10.244.1.2"
LIMIT = 20
ALLOW = Decision(True, "", "allowed")


class _Records:
    def opened(self, record: ConnectionRecord) -> None: ...

    def closed(self, close: ConnectionClose) -> None: ...


class _Authorizer:
    """Says whether a decision is reusable as told; decides nothing here."""

    def __init__(self) -> None:
        self.reuse = True
        self.deny = False

    def authorize(self, attrs: ConnectionAttrs) -> Decision:
        return Decision(False, "app/deny", "denied now") if self.deny else ALLOW

    def reusable(self, attrs: ConnectionAttrs, decision: Decision) -> bool:
        return self.reuse

    def mtls_mode(self, workload: Workload, port: int) -> str:
        return "STRICT"


class _Credentials:
    def __init__(self, pki: Pki) -> None:
        self._pki = pki
        self.rotated = False

    def svid_for(self, spiffe_id: SpiffeId) -> object:
        return self._pki.client if self.rotated else self._pki.server

    def trust_bundle_pem(self) -> bytes:
        return self._pki.bundle


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@pytest.fixture
def rt(pki: Pki) -> Iterator[Runtime]:
    engine = Engine(threads=1)
    engine.start()
    snap = MeshSnapshot(node="node-2")
    runtime = Runtime(
        node="node-2", state=lambda: snap, authorizer=_Authorizer(), engine=engine, loop=ControlLoop(),
        table=ConnectionTable(_Records()), pool=Pool(), tls=TlsContexts(engine, _Credentials(pki)),  # type: ignore[arg-type]
        preserve_source_ip=True, budgets=Budgets(Limits(hbone_streams_per_source=LIMIT)),
    )  # fmt: skip
    runtime.tls.server(DST)  # the destination's server context exists, as once a connection was served
    yield runtime
    engine.stop()


def _fast(rt: Runtime, capacity: int = 8) -> InboundFastPath:
    fast = InboundFastPath(rt, capacity=capacity, credits=8)
    fast.start()
    return fast


def _allowed(
    rt: Runtime, fast: InboundFastPath, conn: int = 7, claim: str = PEER, **changes: object
) -> Allowed:
    attrs = ConnectionAttrs(SRC, PEER, "10.244.2.2", 8080, "app/b", "app")
    record = ConnectionRecord(0, Direction.INBOUND, PEER, 0, "10.244.2.2", 8080, str(SRC), str(DST))
    allowed = Allowed(
        fast.generation(), rt.state(), conn, "10.244.2.2:8080", claim, attrs, ALLOW, record,
        ("10.244.2.2", 8080), PEER, 0, PEER, 15008, port_from_claim=True, local=DST,
    )  # fmt: skip
    return dataclasses.replace(allowed, **changes)  # type: ignore[arg-type]


def _engine_entries(rt: Runtime) -> int:
    return rt.engine.counters()["fastpath_in_entries"]


def test_credits_reserve_the_peer_budget_and_come_back(rt: Runtime) -> None:
    fast = _fast(rt)
    fast.offer(_allowed(rt, fast))
    budget = rt.budgets.hbone_source_streams
    assert len(fast) == 1 and budget.held(PEER) == 8 and _engine_entries(rt) == 1
    fast.forget_conn(7)  # the HBONE connection closed: its entries go, their units come back
    assert len(fast) == 0 and budget.held(PEER) == 0 and _engine_entries(rt) == 0


def test_nothing_is_installed_unless_the_decision_is_reusable(rt: Runtime) -> None:
    fast = _fast(rt)
    never = [
        _allowed(rt, fast, decision=Decision(False, "app/deny", "denied")),
        _allowed(rt, fast, decision=dataclasses.replace(ALLOW, audited=True)),
        _allowed(rt, fast, decision=dataclasses.replace(ALLOW, dry_run=True)),
        _allowed(rt, fast, claim="fd00::2"),  # the engine reads IPv4 claims only
        _allowed(rt, fast, snapshot=MeshSnapshot(node="node-2")),  # decided with another view
        _allowed(rt, fast, generation=-1),
    ]
    for allowed in never:
        fast.offer(allowed)
    rt.authorizer.reuse = False  # type: ignore[attr-defined]  # e.g. a RegoPolicy applies
    fast.offer(_allowed(rt, fast))
    assert len(fast) == 0 and _engine_entries(rt) == 0 and rt.budgets.hbone_source_streams.held(PEER) == 0


def test_no_entry_for_a_peer_near_its_budget(rt: Runtime) -> None:
    fast = _fast(rt)
    for _ in range(LIMIT - 1):
        rt.budgets.hbone_source_streams.take(PEER)
    fast.offer(_allowed(rt, fast))
    assert len(fast) == 0  # each of its streams is checked the ordinary way


def test_table_bound_stale_generation_and_new_snapshot(rt: Runtime) -> None:
    fast = _fast(rt, capacity=1)
    fast.offer(_allowed(rt, fast, conn=7))
    fast.offer(_allowed(rt, fast, conn=8))
    assert len(fast) == 1 and rt.counters["fastpath_in_table_full"] == 1
    stale = fast.generation()
    fast.invalidate()  # any thread: a new snapshot, policy or identity
    fast.tick()  # on the loop: stale entries are removed
    assert len(fast) == 0 and _engine_entries(rt) == 0
    fast.offer(_allowed(rt, fast, generation=stale))
    assert len(fast) == 0 and rt.counters["fastpath_in_install_refused"] == 1
    fast.offer(_allowed(rt, fast))
    assert len(fast) == 1
    new = MeshSnapshot(node="node-2")
    rt.state = lambda: new  # a lookup published a new view without telling the proxy
    fast.tick()
    assert len(fast) == 0 and _engine_entries(rt) == 0
    assert rt.budgets.hbone_source_streams.held(PEER) == 0


def test_a_rotated_or_forgotten_destination_certificate_removes_its_entries(rt: Runtime) -> None:
    fast = _fast(rt)
    fast.offer(_allowed(rt, fast))
    fast.tick()
    assert len(fast) == 1
    rt.tls._credentials.rotated = True  # type: ignore[attr-defined]  # the destination's SVID renewed
    rt.tls.server(DST)  # the next served connection builds the new context
    fast.tick()
    assert len(fast) == 0 and _engine_entries(rt) == 0
    fast.offer(_allowed(rt, fast))
    assert len(fast) == 1
    rt.tls.forget(set())  # the destination left the node
    fast.tick()
    assert len(fast) == 0 and rt.budgets.hbone_source_streams.held(PEER) == 0


def test_a_stream_accepted_in_an_ended_generation_is_decided_again(rt: Runtime) -> None:
    """The engine accepted it before the change; Python sees its event after (the re-check of live
    connections may have run before it was in the table): the current policy decides, and denies."""
    fast = _fast(rt)
    fast.offer(_allowed(rt, fast))
    (entry_id,) = [fe.id for fe in fast._by_key.values()]
    tag = (1 << 61) | 1
    fresh = Event("fast_accept", 7, 1, tag, status=40001, bytes_in=entry_id)
    fast.on_accept(fresh)
    accepted = rt.table.get(tag)
    assert accepted is not None and accepted.response_flags == "-" and accepted.record.source_port == 40001
    rt.authorizer.deny = True  # type: ignore[attr-defined]  # a DENY arrives, then mesh_changed
    fast.invalidate()
    fast.on_accept(Event("fast_accept", 7, 2, tag + 1, status=40002, bytes_in=entry_id))
    late = rt.table.get(tag + 1)
    assert late is not None and late.response_flags == "DENY"  # reset; its close event reports DENY
    assert rt.counters["fastpath_in_redecided"] == 1 and rt.counters["closed_by_policy"] == 1


def test_one_peer_cannot_fill_the_table_past_its_budget(rt: Runtime) -> None:
    """Distinct authorities (or claims) from one peer: each entry reserves at most half of what its
    budget has left, so the peer runs out of entries long before the table does, never past its limit."""
    fast = _fast(rt, capacity=100)
    for port in range(8000, 8010):
        fast.offer(_allowed(rt, fast, authority=f"10.244.2.2:{port}"))
    held = rt.budgets.hbone_source_streams.held(PEER)
    assert len(fast) == 5 and held == LIMIT - 1  # credits 8, 6, 3, 1, 1 of LIMIT 20
    fast.clear()
    assert rt.budgets.hbone_source_streams.held(PEER) == 0


def test_a_spent_budget_takes_back_the_unused_credits(rt: Runtime) -> None:
    """The entries' reserved credits filled the peer's budget with no stream using them: the ordinary path,
    finding the budget spent, takes them back before it refuses anything."""
    fast = _fast(rt, capacity=100)
    for port in range(8000, 8010):
        fast.offer(_allowed(rt, fast, authority=f"10.244.2.2:{port}"))
    budget = rt.budgets.hbone_source_streams
    budget.take(PEER)  # one ordinary stream on top: the peer looks full
    assert budget.at_limit(PEER)
    assert fast.reclaim(PEER) == LIMIT - 1
    assert len(fast) == 0 and _engine_entries(rt) == 0 and budget.held(PEER) == 1
    assert rt.counters["fastpath_in_reclaimed"] == LIMIT - 1
    assert fast.reclaim("172.30.0.99") == 0  # another peer's budget is not touched
