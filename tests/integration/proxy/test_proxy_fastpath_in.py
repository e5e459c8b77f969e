"""The inbound fast path end to end (two proxies in the netns lab, nftables capture): node-2's engine accepts
streams identical to ones its Python allowed, with the records the ordinary path writes; a policy change
sends the next stream through Python (and denies it), entries go with their HBONE connection, and a
destination a RegoPolicy applies to is never served by the fast path (agent/proxy/fastpath_in.py)."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from agent.lab import state
from tests.integration.proxy.proxy_lab import ECHO, ProxyLab, in_pod, principal, request, running

pytestmark = pytest.mark.root

FASTIN_TAG = 1 << 61  # engine tags of inbound fast path streams (native/src/internal.h AMBIT_FASTIN_TAG_BIT)
PER_CONNECTION = {"event", "conn_id", "source_port", "start_time", "trace_id", "bytes_sent", "bytes_received"}
REGO = {
    "apiVersion": "ambit.io/v1",
    "kind": "RegoPolicy",
    "metadata": {"name": "allow-all", "namespace": "app"},
    "spec": {
        "selector": {"matchLabels": {"app": "pod-2-2"}},
        "module": "package ambit\ndefault authz := true",
    },
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyLab]:
    prefix = "i" + uuid.uuid4().hex[:4] + "-"
    workdir = tmp_path_factory.mktemp("fastpath-in")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AMBIT_LAB_STATE_DIR", str(workdir))
        mp.setenv("AMBIT_LAB_PREFIX", prefix)
        with running(prefix, workdir, policies=[REGO]) as started:
            yield started


def _engine(lab: ProxyLab) -> dict[str, int]:
    return lab.status("node-2").get("engine", {})


def _hits(lab: ProxyLab) -> int:
    return _engine(lab).get("fastpath_in_hits", 0)


def answer(ip: str, port: int, payload: bytes) -> bytes:
    """In a pod: the echo, or b"" when the connection was refused (closed or reset before the answer)."""
    try:
        return request(ip, port, payload)
    except OSError:
        return b""


def _echo(lab: ProxyLab, payload: bytes, pod: str = "pod-1-1", dst: str = "pod-2-1") -> bytes:
    return in_pod(lab, pod, answer, lab.pod_ip(dst), ECHO, payload)  # type: ignore[no-any-return]


def _warm(lab: ProxyLab) -> None:
    """Connections until node-2's engine accepts one (the first ones Python decides and installs)."""
    before = _hits(lab)
    for i in range(20):
        assert _echo(lab, b"warm %d" % i) == b"warm %d" % i
        time.sleep(0.25)  # the status file is rewritten every 0.2 s
        if _hits(lab) > before:
            return
    raise AssertionError(f"the inbound fast path never accepted a stream: {_engine(lab)}")


def _inbound(lab: ProxyLab, dst: str = "pod-2-1") -> list[dict[str, Any]]:
    ip = lab.pod_ip(dst)
    return [
        e
        for e in lab.events("node-2")
        if e["event"] == "closed" and e["direction"] == "inbound" and e["destination_ip"] == ip
    ]


def _reload(lab: ProxyLab, deny: list[list[str]]) -> None:
    """node-2 re-reads its config with this deny list, as the daemon applies a new policy: the policy
    first, then the view, then `mesh_changed`."""
    path = lab.workdir / "node-2.json"
    cfg = json.loads(path.read_text())
    cfg["deny"] = deny
    path.write_text(json.dumps(cfg))
    before = lab.status("node-2").get("reloads", 0)
    lab_state = state.load(lab.prefix)
    assert lab_state is not None
    (pid,) = [p.pid for p in lab_state.processes if p.name == "proxy-node-2"]
    os.kill(pid, signal.SIGUSR2)
    lab.wait_status("node-2", lambda st: st.get("reloads", 0) > before)


def test_fast_streams_deliver_and_are_recorded_as_the_ordinary_path_records_them(lab: ProxyLab) -> None:
    _warm(lab)
    assert _echo(lab, b"fast inbound") == b"fast inbound"
    lab.wait_status("node-2", lambda st: any(r["conn_id"] & FASTIN_TAG for r in _inbound(lab)))
    time.sleep(0.5)
    records = _inbound(lab)
    fast = [r for r in records if r["conn_id"] & FASTIN_TAG]
    slow = [r for r in records if not r["conn_id"] & FASTIN_TAG]
    assert fast and slow, records
    same = {k: v for k, v in slow[-1].items() if k not in PER_CONNECTION}
    for rec in fast:
        assert {k: v for k, v in rec.items() if k in same} == same
        assert set(rec) == set(slow[-1])
        assert rec["bytes_sent"] == rec["bytes_received"] > 0 and rec["response_flags"] == "-"
    last = fast[-1]
    assert (last["source_principal"], last["source_ip"]) == (principal("pod-1-1"), lab.pod_ip("pod-1-1"))
    assert last["policy"] == slow[-1]["policy"] and last["trace_id"]
    # Both ends recorded the connection: the source's record joins on the traceparent it sent.
    out = lab.wait_closed("node-1", lambda ev: ev["trace_id"] == last["trace_id"])
    assert out["direction"] == "outbound" and out["source_port"] == last["source_port"]
    assert out["bytes_sent"] == last["bytes_sent"]
    st = lab.status("node-2")
    assert st["counters"]["fastpath_in_accepted"] >= len(fast) and st["counters"]["fastpath_in_entries"] >= 1


def test_policy_change_sends_the_next_stream_through_python_and_denies_it(lab: ProxyLab) -> None:
    """A DENY added between two connections: the second is decided by the new policy, never by a stale
    entry (then the DENY removed again: allowed, and fast again once Python re-installed it)."""
    _warm(lab)
    _reload(lab, [[principal("pod-1-1"), "app/pod-2-1"]])
    hits, misses = _hits(lab), _engine(lab)["fastpath_in_misses"]
    assert _echo(lab, b"after deny") == b""
    denied = lab.wait_closed(
        "node-2", lambda ev: ev["response_flags"] == "DENY" and ev["direction"] == "inbound"
    )
    assert not denied["conn_id"] & FASTIN_TAG and denied["source_principal"] == principal("pod-1-1")
    lab.wait_status("node-2", lambda st: st["engine"]["fastpath_in_misses"] > misses)
    assert _hits(lab) == hits
    _reload(lab, [])
    assert _echo(lab, b"allowed again") == b"allowed again"
    _warm(lab)


def test_entries_go_with_their_hbone_connection(lab: ProxyLab) -> None:
    """node-1 closes pooled connections idle for 3 s: node-2 drops the entries of the connection."""
    _warm(lab)
    assert lab.status("node-2")["counters"]["fastpath_in_entries"] >= 1
    lab.wait_status(
        "node-2",
        lambda st: st["counters"]["fastpath_in_entries"] == 0 and st["engine"]["fastpath_in_entries"] == 0,
        timeout=20,
    )
    hits = _hits(lab)
    assert _echo(lab, b"new connection") == b"new connection"
    time.sleep(0.5)
    assert _hits(lab) == hits  # the new HBONE connection's first stream is Python's


def test_a_destination_with_a_rego_policy_is_never_served_by_the_fast_path(lab: ProxyLab) -> None:
    """pod-2-2 has a RegoPolicy (allowing all): each of its streams is decided in Python, however many
    identical ones came before (pod-2-1, without one, turns fast after the first: the tests above)."""
    before = lab.status("node-2")
    for i in range(6):
        assert _echo(lab, b"rego %d" % i, pod="pod-1-2", dst="pod-2-2") == b"rego %d" % i
    lab.wait_status("node-2", lambda st: len(_inbound(lab, "pod-2-2")) >= 6)
    after = lab.status("node-2")
    assert all(not r["conn_id"] & FASTIN_TAG for r in _inbound(lab, "pod-2-2"))
    assert after["engine"]["fastpath_in_hits"] == before["engine"]["fastpath_in_hits"]
    assert after["counters"].get("fastpath_in_installed", 0) == before["counters"].get(
        "fastpath_in_installed", 0
    )
