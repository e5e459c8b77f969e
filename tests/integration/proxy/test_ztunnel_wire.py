"""HBONE on the wire as Istio ambient's ztunnel speaks it, against the agent, both directions.

node-1 runs the ambit proxy with the product's eBPF capture; node-2 runs no ambit at all: the fake ztunnel
(fake_ztunnel.py, Python h2 + ssl) plays its node, serving `<pod ip>:15008` for node-2's pods (nftables
tproxy) and dialling from node-2's pod addresses. Each test names the wire fact it checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from agent import netns as nsx
from agent.lab import control
from agent.netns import NetnsError
from tests.integration.proxy import fake_ztunnel
from tests.integration.proxy.fake_ztunnel import FRAME, MAX_STREAMS, Request
from tests.integration.proxy.proxy_lab import (
    ECHO,
    HERE,
    WHOAMI,
    ProxyLab,
    connect_and_read,
    in_pod,
    principal,
    request,
    running,
)

pytestmark = pytest.mark.root

DENIED_SRC, DENIED_DST = "pod-2-2", "pod-1-2"  # ambit's policy (node-1) denies this pair
GOAWAY_PORT = 9099  # after a stream to this port the fake ztunnel server sends a graceful GOAWAY
CLOSE_PORT, GOAWAY_CLOSE_PORT = 9098, 9097  # ... ends the connection right after it (without, with GOAWAY)
IMPOSTOR = "pod-2-3"  # the fake ztunnel presents pod-2-1's SVID on this pod's address
BAGGAGE = (
    "k8s.cluster.name=Kubernetes,k8s.namespace.name=app,k8s.deployment.name=pod-2-1,"
    "service.name=pod-2-1,service.version=v1"
)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyLab]:
    prefix = "z" + uuid.uuid4().hex[:4] + "-"
    workdir = tmp_path_factory.mktemp("ztunnelwire")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AMBIT_LAB_STATE_DIR", str(workdir))
        mp.setenv("AMBIT_LAB_PREFIX", prefix)
        deny = [(principal(DENIED_SRC), f"app/{DENIED_DST}")]
        with running(prefix, workdir, pods=3, deny=deny, capture="bpf", foreign=["node-2"]) as started:
            _start_fake_server(started)
            yield started


def _node2_cfg(lab: ProxyLab) -> dict[str, Any]:
    return dict(json.loads((lab.workdir / "node-2.json").read_text()))


def _svid(lab: ProxyLab, pod: str) -> tuple[str, str]:
    chain, key = _node2_cfg(lab)["svids"][principal(pod)]
    return str(chain), str(key)


def _start_fake_server(lab: ProxyLab) -> None:
    cfg = _node2_cfg(lab)
    present = {lab.pod_ip(p): _svid(lab, p) for p in ("pod-2-1", "pod-2-2")}
    present[lab.pod_ip(IMPOSTOR)] = _svid(lab, "pod-2-1")  # not the identity the mesh says lives there
    path = lab.workdir / "fake-ztunnel.json"
    doc = {
        "present": present,
        "bundle_pem": cfg["bundle_pem"],
        "deny_ports": [WHOAMI],
        "goaway_ports": [GOAWAY_PORT],
        "close_ports": [CLOSE_PORT],
        "goaway_close_ports": [GOAWAY_CLOSE_PORT],
        "events": str(_events(lab)),
    }
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    argv = [sys.executable, str(HERE / "fake_ztunnel.py"), "serve", str(path)]
    env_path = os.pathsep.join(sys.path)
    argv = ["env", f"PYTHONPATH={env_path}", *argv]
    control.start_process(lab.prefix, "fake-ztunnel", lab.plan.node("node-2").netns, argv,
                          lab.workdir / "fake-ztunnel.log")  # fmt: skip
    deadline = time.monotonic() + 15
    while "ready" not in lab.log("fake-ztunnel"):
        assert time.monotonic() < deadline, lab.log("fake-ztunnel")
        time.sleep(0.05)


def _events(lab: ProxyLab) -> Any:
    return lab.workdir / "fake-ztunnel.events.jsonl"


def _server_saw(lab: ProxyLab, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = _events(lab)
        for line in path.read_text().splitlines() if path.exists() else []:
            ev = json.loads(line)
            if predicate(ev):
                return dict(ev)
        time.sleep(0.05)
    raise AssertionError(f"the fake ztunnel never saw it: {path.read_text() if path.exists() else ''}")


def _ztunnel_connects(lab: ProxyLab, src: str, dst: str, requests: list[Request]) -> dict[str, Any]:
    """The fake ztunnel client on node-2, from `src`'s address to `<dst ip>:15008`, as `src`."""
    chain, key = _svid(lab, src)
    bundle = _node2_cfg(lab)["bundle_pem"]
    args = (lab.pod_ip(src), lab.pod_ip(dst), chain, key, bundle, requests, principal(dst))
    return dict(nsx.run_in(lab.plan.node("node-2").netns, fake_ztunnel.connect, *args, timeout=60))


def _ztunnel_headers(lab: ProxyLab, src: str) -> tuple[tuple[str, str], ...]:
    return (
        ("forwarded", f'for="{lab.pod_ip(src)}:43210"'),
        ("baggage", BAGGAGE),
        ("traceparent", TRACEPARENT),
    )


# --- ztunnel -> ambit -------------------------------------------------------------------------------


def test_ztunnel_client_reaches_an_ambit_pod(lab: ProxyLab) -> None:
    """Dialled at <pod ip>:15008 from the source pod's IP, ambit presents the destination workload's SVID
    (no SNI), accepts ztunnel's SETTINGS and 1 MiB frames, answers 200 and carries the bytes both ways;
    the record names the source pod from the TCP peer address."""
    payload = os.urandom(3 * FRAME + 12345)
    target = f"{lab.pod_ip('pod-1-1')}:{ECHO}"
    got = _ztunnel_connects(
        lab, "pod-2-1", "pod-1-1", [Request(target, payload, _ztunnel_headers(lab, "pod-2-1"))]
    )
    assert got["server_id"] == principal("pod-1-1")  # the workload's SVID, never spiffe://td/node/N
    # ztunnel requires exactly that identity: the same client expecting another pod's fails the connection
    with pytest.raises(NetnsError, match="PeerIdentityError"):
        chain, key = _svid(lab, "pod-2-1")
        args = (lab.pod_ip("pod-2-1"), lab.pod_ip("pod-1-1"), chain, key, _node2_cfg(lab)["bundle_pem"],
                [Request(target, b"x")], principal("pod-1-2"))  # fmt: skip
        nsx.run_in(lab.plan.node("node-2").netns, fake_ztunnel.connect, *args, timeout=60)
    assert (got["tls_version"], got["alpn"]) == ("TLSv1.3", "h2")
    (stream,) = got["streams"]
    assert stream["status"] == 200 and stream["echoed"], stream
    # ambit accepts ztunnel's 1 MiB frames and advertises ztunnel's 200 concurrent streams
    assert got["settings"]["max_frame_size"] == FRAME and max(stream["frames"]) == FRAME
    assert got["settings"]["max_concurrent_streams"] == MAX_STREAMS
    rec = lab.wait_closed(
        "node-1",
        lambda ev: ev["direction"] == "inbound" and ev["source_principal"] == principal("pod-2-1")
        and ev["destination_port"] == ECHO,
    )  # fmt: skip
    assert rec["source_ip"] == lab.pod_ip("pod-2-1")
    assert rec["source_port"] == 43210  # the client's port from ztunnel's `forwarded: for="ip:port"`
    assert rec["destination_principal"] == principal("pod-1-1")
    assert rec["bytes_sent"] == rec["bytes_received"] == len(payload)
    assert rec["trace_id"] == TRACEPARENT.split("-")[1]  # joins ztunnel's records of this connection


def test_peer_baggage_names_a_source_the_mesh_does_not_know(lab: ProxyLab) -> None:
    """From an address of node-2's pod range that no workload holds (ambit cannot believe it), the record
    names the source workload from ztunnel's baggage, within the namespace of the peer's identity."""
    unknown_ip = lab.pod_ip("pod-2-1").rsplit(".", 1)[0] + ".77"
    chain, key = _svid(lab, "pod-2-1")
    target = f"{lab.pod_ip('pod-1-1')}:{WHOAMI}"
    headers = (("baggage", BAGGAGE.replace("pod-2-1", "orders")), ("traceparent", TRACEPARENT))
    args = (
        unknown_ip,
        lab.pod_ip("pod-1-1"),
        chain,
        key,
        _node2_cfg(lab)["bundle_pem"],
        [Request(target, b"", headers)],
        principal("pod-1-1"),
    )
    got = nsx.run_in(lab.plan.node("node-2").netns, fake_ztunnel.connect, *args, timeout=60)
    assert got["streams"][0]["status"] == 200
    rec = lab.wait_closed(
        "node-1", lambda ev: ev["source_ip"] == unknown_ip and ev["destination_port"] == WHOAMI
    )
    assert rec["source_workload"] == "app/orders" and rec["source_principal"] == principal("pod-2-1")
    lab.wait_status("node-1", lambda st: st["counters"].get("hbone_baggage_used", 0) >= 1)


def test_authority_must_be_the_dialled_address(lab: ProxyLab) -> None:
    """A CONNECT naming another pod than the one dialled is refused 400 (as ztunnel does); the other
    streams on the connection are unaffected."""
    good = Request(f"{lab.pod_ip('pod-1-1')}:{ECHO}", b"ok", _ztunnel_headers(lab, "pod-2-1"))
    other = Request(f"{lab.pod_ip('pod-1-2')}:{ECHO}", b"nope", _ztunnel_headers(lab, "pod-2-1"))
    got = _ztunnel_connects(lab, "pod-2-1", "pod-1-1", [good, other])
    assert [s["status"] for s in got["streams"]] == [200, 400]
    assert got["streams"][0]["echoed"]
    lab.wait_status("node-1", lambda st: st["counters"].get("inbound_refused_400", 0) >= 1)


def test_ambit_denial_reaches_ztunnel_as_a_refusal(lab: ProxyLab) -> None:
    target = f"{lab.pod_ip(DENIED_DST)}:{ECHO}"
    got = _ztunnel_connects(
        lab, DENIED_SRC, DENIED_DST, [Request(target, b"x", _ztunnel_headers(lab, DENIED_SRC))]
    )
    assert got["streams"][0]["status"] in (401, 403)
    rec = lab.wait_closed(
        "node-1", lambda ev: ev["source_principal"] == principal(DENIED_SRC) and ev["direction"] == "inbound"
    )
    assert rec["response_flags"] == "DENY" and rec["source_ip"] == lab.pod_ip(DENIED_SRC)


# --- ambit -> ztunnel -------------------------------------------------------------------------------


def test_ambit_client_reaches_a_ztunnel_pod(lab: ProxyLab) -> None:
    """ambit dials <pod ip>:15008 from the source pod's IP, requires the destination workload's SVID,
    presents the source's, and sends the CONNECT ztunnel expects."""
    payload = os.urandom(200_000)
    assert in_pod(lab, "pod-1-1", request, lab.pod_ip("pod-2-1"), ECHO, payload) == payload
    seen = _server_saw(
        lab, lambda ev: ev["kind"] == "request" and ev["headers"].get(":authority", "").endswith(f":{ECHO}")
    )
    assert seen["peer"][0] == lab.pod_ip("pod-1-1")  # the outer connection comes from the pod's address
    assert seen["local"] == lab.pod_ip("pod-2-1")
    assert seen["peer_id"] == principal("pod-1-1") and seen["alpn"] == "h2"
    headers = seen["headers"]
    assert headers[":method"] == "CONNECT" and headers[":authority"] == f"{lab.pod_ip('pod-2-1')}:{ECHO}"
    match = {"direction": "outbound", "destination_port": ECHO, "destination_ip": lab.pod_ip("pod-2-1")}
    out = lab.wait_closed("node-1", lambda ev: all(ev[k] == v for k, v in match.items()))
    # As ztunnel: the client's address and its real source port (the captured socket's peer port).
    assert out["source_port"] > 0
    assert headers["forwarded"] == f'for="{lab.pod_ip("pod-1-1")}:{out["source_port"]}"'
    assert seen["status"] == 200
    members = dict(m.split("=", 1) for m in headers["baggage"].split(","))
    assert members["k8s.namespace.name"] == "app" and members["k8s.pod.name"] == "pod-1-1"
    assert members["service.name"] == "pod-1-1" and members["k8s.cluster.name"]
    version, trace, parent, flags = headers["traceparent"].split("-")
    assert (version, len(trace), len(parent), flags) == ("00", 32, 16, "00")
    assert out["destination_principal"] == principal("pod-2-1") and out["response_flags"] == "-"
    assert out["bytes_sent"] == out["bytes_received"] == len(payload)
    assert out["trace_id"] == trace


def test_ztunnel_401_is_a_policy_denial(lab: ProxyLab) -> None:
    assert in_pod(lab, "pod-1-1", connect_and_read, lab.pod_ip("pod-2-1"), WHOAMI) in ("reset", "eof")
    _server_saw(lab, lambda ev: ev["kind"] == "request" and ev["status"] == 401)
    rec = lab.wait_closed(
        "node-1", lambda ev: ev["destination_port"] == WHOAMI and ev["direction"] == "outbound"
    )
    assert rec["response_flags"] == "DENY"


def test_server_with_another_identity_is_refused(lab: ProxyLab) -> None:
    """The server at pod-2-3's address presents pod-2-1's SVID: ambit requires pod-2-3's and refuses."""
    assert in_pod(lab, "pod-1-1", connect_and_read, lab.pod_ip(IMPOSTOR), ECHO) in ("reset", "eof")
    rec = lab.wait_closed("node-1", lambda ev: ev["destination_ip"] == lab.pod_ip(IMPOSTOR))
    assert rec["response_flags"] == "UF" and "identity" in rec["error"]
    lab.wait_status("node-1", lambda st: st["engine"]["errors_peer_identity"] >= 1)
    # An identity refusal is a security event: audited with what the server presented.
    deadline = time.monotonic() + 10
    while not (audited := [a for a in lab.audit("node-1") if a["event"] == "hbone_server_refused"]):
        assert time.monotonic() < deadline, "no audit record"
        time.sleep(0.05)
    assert audited[-1]["peer_id"] == principal("pod-2-1") and "mismatch" in audited[-1]["reason"]


def test_ztunnel_advertises_200_streams_and_ambit_sees_them(lab: ProxyLab) -> None:
    """The fake's SETTINGS reach ambit's client (what ztunnel advertises), and ambit's reach the fake."""
    assert in_pod(lab, "pod-1-2", request, lab.pod_ip("pod-2-2"), ECHO, b"settings") == b"settings"
    seen = _server_saw(lab, lambda ev: ev["kind"] == "request" and ev["peer"][0] == lab.pod_ip("pod-1-2"))
    assert seen["settings"]["max_concurrent_streams"] == MAX_STREAMS == 200
    assert seen["settings"]["max_frame_size"] == FRAME


def test_ztunnel_goaway_moves_new_streams_to_a_new_connection(lab: ProxyLab) -> None:
    """ztunnel drains with a graceful GOAWAY and keeps the connection open: ambit's next stream to that pod
    must not go to it (the engine would refuse it there) but over a new pooled connection."""
    dst = lab.pod_ip("pod-2-2")
    assert in_pod(lab, "pod-1-1", request, dst, GOAWAY_PORT, b"last") == b"last"
    _server_saw(lab, lambda ev: ev["kind"] == "sent_goaway" and ev["peer"][0] == lab.pod_ip("pod-1-1"))
    lab.wait_status("node-1", lambda st: st["counters"].get("hbone_peer_goaway", 0) >= 1)
    assert in_pod(lab, "pod-1-1", request, dst, ECHO, b"after goaway") == b"after goaway"
    new = _server_saw(
        lab, lambda ev: ev["kind"] == "request" and ev["headers"][":authority"] == f"{dst}:{ECHO}"
    )
    old = _server_saw(lab, lambda ev: ev["kind"] == "sent_goaway" and ev["peer"][0] == lab.pod_ip("pod-1-1"))
    assert new["peer"] != old["peer"]  # another outer connection (another source port)


def _upload_then_read_late(ip: str, port: int, size: int, delay: float) -> tuple[int, str]:
    """Send `size` bytes, half-close, read nothing for `delay` s (the answer waits in the proxy), then read to
    EOF; returns (bytes read, their sha256)."""
    payload = hashlib.shake_256(b"late reader").digest(size)
    with socket.create_connection((ip, port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # the answer cannot hide in the kernel
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        time.sleep(delay)
        digest, total = hashlib.sha256(), 0
        while chunk := sock.recv(1 << 20):
            digest.update(chunk)
            total += len(chunk)
    return total, digest.hexdigest()


@pytest.mark.parametrize("port", [CLOSE_PORT, GOAWAY_CLOSE_PORT], ids=["eof", "goaway"])
def test_peer_closing_after_a_complete_stream_loses_nothing(lab: ProxyLab, port: int) -> None:
    """The stream ends cleanly (END_STREAM both ways) and the peer closes the connection at once, while
    ambit still holds most of the answer for a client that reads late: the client gets every byte, then
    EOF, and the record is `-` (was: the held bytes dropped with a clean EOF, and the record `UF`)."""
    size = 3 << 20  # within the 4 MiB stream window: all of it arrives before the peer closes
    got = in_pod(lab, "pod-1-2", _upload_then_read_late, lab.pod_ip("pod-2-1"), port, size, 1.0)
    assert got == (size, hashlib.sha256(hashlib.shake_256(b"late reader").digest(size)).hexdigest())
    _server_saw(
        lab, lambda ev: ev["kind"] == "closed_after_stream" and ev["peer"][0] == lab.pod_ip("pod-1-2")
    )
    match = {"direction": "outbound", "destination_port": port, "source_ip": lab.pod_ip("pod-1-2")}
    rec = lab.wait_closed("node-1", lambda ev: all(ev[k] == v for k, v in match.items()))
    assert (rec["response_flags"], rec["bytes_sent"], rec["bytes_received"]) == ("-", size, size), rec
