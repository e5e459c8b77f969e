"""The outbound fast path end to end (two proxies in the netns lab, nftables capture): the engine opens
connections Python installed, with the records the ordinary path writes; a new config, a pooled connection
closing, or a source near its budget sends the next connection through Python (agent/proxy/fastpath.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from agent.lab import state
from tests.integration.proxy.proxy_lab import ECHO, ProxyLab, in_pod, principal, request, running

pytestmark = pytest.mark.root

FAST_TAG = 1 << 62  # engine tags of fast path streams (native/src/internal.h AMBIT_FAST_TAG_BIT)
LIMIT = 8  # pod-1-2's outbound budget
# Per connection by nature: everything else in a fast connection's record equals the ordinary path's.
PER_CONNECTION = {"event", "conn_id", "source_port", "start_time", "trace_id"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyLab]:
    prefix = "f" + uuid.uuid4().hex[:4] + "-"
    workdir = tmp_path_factory.mktemp("fastpath")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AMBIT_LAB_STATE_DIR", str(workdir))
        mp.setenv("AMBIT_LAB_PREFIX", prefix)
        with running(prefix, workdir, outbound_limit=LIMIT) as started:
            yield started


def _engine(lab: ProxyLab, node: str = "node-1") -> dict[str, int]:
    return lab.status(node).get("engine", {})


def _hits(lab: ProxyLab) -> int:
    return _engine(lab).get("fastpath_hits", 0)


def _echo(lab: ProxyLab, payload: bytes, pod: str = "pod-1-1", dst: str = "pod-2-1") -> None:
    assert in_pod(lab, pod, request, lab.pod_ip(dst), ECHO, payload) == payload


def _warm(lab: ProxyLab, pod: str = "pod-1-1") -> None:
    """Connections until the fast path takes one (the first ones route through Python and install it)."""
    before = _hits(lab)
    for i in range(20):
        _echo(lab, b"warm %d" % i, pod)
        time.sleep(0.25)  # the status file is rewritten every 0.2 s
        if _hits(lab) > before:
            return
    raise AssertionError(f"the fast path never opened a connection: {_engine(lab)}")


def hold_answered(ip: str, port: int, count: int) -> int:
    """In a pod: `count` connections held at once; how many echoed (refused ones end without an answer)."""
    socks = [socket.create_connection((ip, port), timeout=10) for _ in range(count)]
    answered = 0
    try:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(b"x")
                answered += sock.recv(1) == b"x"
        return answered
    finally:
        for sock in socks:
            sock.close()


def _closed(lab: ProxyLab, node: str, pod: str) -> list[dict[str, Any]]:
    src = lab.pod_ip(pod)
    return [
        e
        for e in lab.events(node)
        if e["event"] == "closed" and e["source_ip"] == src and e["destination_port"] == ECHO
    ]


def _reload(lab: ProxyLab, node: str) -> None:
    """A new config version (same content): the proxy re-reads it and is told, as the daemon tells it."""
    before = lab.status(node).get("reloads", 0)
    lab_state = state.load(lab.prefix)
    assert lab_state is not None
    (pid,) = [p.pid for p in lab_state.processes if p.name == f"proxy-{node}"]
    os.kill(pid, signal.SIGUSR2)
    lab.wait_status(node, lambda st: st.get("reloads", 0) > before)


def test_fast_connections_are_recorded_as_the_ordinary_path_records_them(lab: ProxyLab) -> None:
    _warm(lab)
    _echo(lab, b"fast one")
    lab.wait_status("node-1", lambda st: len(_closed(lab, "node-1", "pod-1-1")) >= 2)
    time.sleep(0.5)
    records = _closed(lab, "node-1", "pod-1-1")
    fast = [r for r in records if r["conn_id"] >= FAST_TAG]
    slow = [r for r in records if r["conn_id"] < FAST_TAG]
    assert fast and slow, records
    same = {k: v for k, v in slow[-1].items() if k not in PER_CONNECTION | {"bytes_sent", "bytes_received"}}
    for rec in fast:
        assert {k: v for k, v in rec.items() if k in same} == same
        assert set(rec) == set(slow[-1])
        assert rec["bytes_sent"] == rec["bytes_received"] > 0
    last = fast[-1]
    assert (last["response_flags"], last["source_principal"]) == ("-", principal("pod-1-1"))
    assert last["tls_version"].startswith("TLSv1.3") and last["destination_principal"] == principal("pod-2-1")
    # The traceparent the engine generated is the one sent: the destination's record joins on it.
    inbound = lab.wait_closed("node-2", lambda ev: ev["trace_id"] == last["trace_id"] and ev["trace_id"])
    assert inbound["source_ip"] == lab.pod_ip("pod-1-1") and inbound["response_flags"] == "-"
    assert inbound["source_port"] == last["source_port"]  # forwarded: for="<ip>:<client port>" per stream
    opened = [e for e in lab.events("node-1") if e["event"] == "opened" and e["conn_id"] == last["conn_id"]]
    assert len(opened) == 1
    counters = lab.status("node-1")["counters"]
    assert counters["fastpath_opened"] >= len(fast) and counters["fastpath_entries"] >= 1


def test_new_config_sends_the_next_connection_through_python(lab: ProxyLab) -> None:
    _warm(lab)
    _reload(lab, "node-1")
    hits, misses = _hits(lab), _engine(lab)["fastpath_misses"]
    _echo(lab, b"after reload")
    lab.wait_status("node-1", lambda st: st["engine"]["fastpath_misses"] > misses)
    assert _hits(lab) == hits
    _warm(lab)  # and the ordinary path installs it again


def test_closed_pooled_connection_sends_the_next_connection_through_python(lab: ProxyLab) -> None:
    """The lab closes pooled connections idle for 3 s: their entries go with them."""
    _warm(lab)
    lab.wait_status(
        "node-1", lambda st: st["counters"]["fastpath_entries"] == 0 and not st["pool"], timeout=20
    )
    hits = _hits(lab)
    _echo(lab, b"after close")
    time.sleep(0.5)
    assert _hits(lab) == hits


def test_fast_path_never_takes_a_pod_past_its_budget(lab: ProxyLab) -> None:
    """Credits are reserved from the pod's outbound budget: held connections never exceed it."""
    _warm(lab, "pod-1-2")
    answered = in_pod(lab, "pod-1-2", hold_answered, lab.pod_ip("pod-2-1"), ECHO, LIMIT + 4)
    assert answered <= LIMIT
    st = lab.wait_status("node-1", lambda st: st["counters"].get("outbound_refused_UO", 0) >= 4)
    assert st["counters"]["limit_refused_outbound_connections_per_source"] >= 4
    assert sum(r["response_flags"] == "UO" for r in _closed(lab, "node-1", "pod-1-2")) >= 4


def test_a_burst_of_fast_connections_is_recorded_exactly(lab: ProxyLab) -> None:
    """Concurrent connections share event drains (the engine batches their informational events' wake-up):
    each still gets exactly one opened and one closed record on both nodes, and the counts add up. A pod
    below its budget is never refused for the credits the fast path reserved from it (before: 3 of 6
    concurrent connections of a pod with a budget of 8 were refused UO)."""
    _warm(lab)
    seen = {r["conn_id"] for r in _closed(lab, "node-1", "pod-1-1")}

    def new(node: str) -> list[dict[str, Any]]:
        return [r for r in _closed(lab, node, "pod-1-1") if r["conn_id"] not in seen or node != "node-1"]

    src = lab.pod_ip("pod-1-1")

    def idle(st: dict[str, Any]) -> bool:  # node-1 holds none of pod-1-1's connections (budget units)
        return not [r for r in st.get("rows", []) if str(r.get("source", "")).startswith(f"{src}:")]

    rounds, at_once = 5, LIMIT - 2
    for done in range(1, rounds + 1):
        lab.wait_status("node-1", idle, timeout=30)
        answered = in_pod(lab, "pod-1-1", hold_answered, lab.pod_ip("pod-2-1"), ECHO, at_once)
        why = [(r["response_flags"], r["error"]) for r in new("node-1")[-at_once:]]
        assert answered == at_once, f"round {done}: {answered} of {at_once} answered; last records {why}"
        # the round's records are written (and its units back) before the next round
        lab.wait_status("node-1", lambda st, n=done: len(new("node-1")) >= n * at_once, timeout=30)
    total = rounds * at_once
    lab.wait_status("node-1", lambda st: len(new("node-1")) >= total)
    time.sleep(0.5)  # nothing more may follow
    burst = new("node-1")
    assert len(burst) == total and len({r["conn_id"] for r in burst}) == total
    assert any(r["conn_id"] >= FAST_TAG for r in burst)
    assert all((r["response_flags"], r["bytes_sent"], r["bytes_received"]) == ("-", 1, 1) for r in burst)
    ids = {r["conn_id"] for r in burst}
    opened = [e for e in lab.events("node-1") if e["event"] == "opened" and e["conn_id"] in ids]
    assert sorted(e["conn_id"] for e in opened) == sorted(ids)
    traces = {r["trace_id"] for r in burst}
    assert len(traces) == total and "" not in traces
    lab.wait_status("node-2", lambda st: traces <= {r["trace_id"] for r in new("node-2")}, timeout=30)
    assert sum(r["trace_id"] in traces for r in new("node-2")) == total
    counters = lab.status("node-1")["counters"]
    assert counters["engine_events"] >= counters["engine_event_drains"] > 0
