"""A netns lab with one proxy per node, test servers in every pod and a capture steering pod traffic.

Shared by the proxy integration tests and tests/bench/bench_tunnel.py. Capture: the eBPF redirect is the
product's; here nftables `tproxy` (the fallback ARCHITECTURE.md lists) steers new pod connections to
:15001 and `socket transparent` hands replies to the proxy's spoofed-source sockets, so these tests
exercise the proxy alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import netns as nsx
from agent.lab import control
from agent.lab.plan import LabPlan, plan_lab
from agent.lab.probe import echo_roundtrip
from agent.redirect import pins
from agent.redirect.marks import (
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
    ROUTE_MARK,
    ROUTE_MASK,
    ROUTE_TABLE,
)
from api.spiffe import SpiffeId
from mgmt.ca import CertificateAuthority

TRUST_DOMAIN = "cluster.local"
HERE = Path(__file__).resolve().parent
ECHO, SHA_SINK, RESET, WHOAMI, COUNT_SINK, BANNER_SHA = 8080, 8081, 8082, 8083, 8084, 8085
BANNER = b"ambit-banner\n"  # pod_servers.BANNER
SERVICE_IP, SERVICE_PORT = "10.96.0.10", 80  # Service "app/echo": port 80 -> pod-2-1:8080
SERVICE_CIDR = "10.96.0.0/16"

# New connections from enrolled pods -> 15001; new connections from other nodes to an enrolled local pod's
# 15008 -> the HBONE listener (mTLS as that pod), to its other ports -> 15006 (plaintext inbound); packets
# of flows owned by a transparent proxy socket (replies to HBONE sent from a pod's address) -> that socket.
CAPTURE_RULES = """
table ip ambit_proxy_test {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 meta mark set {mark:#x} accept
    iifname "vp*" ip saddr {{ {pods} }} tcp flags & (syn | ack) == syn tproxy to :{outbound} \\
      meta mark set {mark:#x} accept
    iifname "eth0" ip daddr {{ {pods} }} tcp dport {hbone} tcp flags & (syn | ack) == syn \\
      tproxy to :{hbone} meta mark set {mark:#x} accept
    iifname "eth0" ip daddr {{ {pods} }} tcp flags & (syn | ack) == syn tproxy to :{plaintext} \\
      meta mark set {mark:#x} accept
  }}
}}
"""


def run_in_netns(netns: str, argv: list[str], stdin: bytes | None = None) -> None:
    proc = nsx.popen_in(netns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(stdin, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {netns}: {err.decode() or out.decode()}")


def install_capture(netns: str, enrolled_ips: list[str]) -> None:
    if enrolled_ips:
        rules = CAPTURE_RULES.format(
            mark=ROUTE_MARK,
            outbound=OUTBOUND_PORT,
            plaintext=INBOUND_PLAINTEXT_PORT,
            hbone=HBONE_PORT,
            pods=", ".join(enrolled_ips),
        )
        run_in_netns(netns, ["nft", "-f", "-"], rules.encode())
    run_in_netns(
        netns, ["ip", "rule", "add", "fwmark", f"{ROUTE_MARK:#x}/{ROUTE_MASK:#x}", "lookup", str(ROUTE_TABLE)]
    )
    run_in_netns(netns, ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE)])


def issue(ca: CertificateAuthority, spiffe_id: SpiffeId) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.issue(spiffe_id, key.public_key())
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain_pem.decode(), key_pem.decode()


def service_account(pod: str) -> str:
    return f"sa-{pod}"


def principal(pod: str) -> str:
    return str(SpiffeId.workload(TRUST_DOMAIN, "app", service_account(pod)))


@dataclass
class ProxyLab:
    prefix: str
    plan: LabPlan
    workdir: Path
    extra_workloads: list[dict[str, str]] = field(default_factory=list)
    ca: CertificateAuthority | None = None  # the lab's CA: tests forge or issue client certificates with it
    foreign: set[str] = field(default_factory=set)  # nodes without an ambit proxy

    def pod_ip(self, pod: str) -> str:
        return self.plan.pod(pod).ip

    def pod_netns(self, pod: str) -> str:
        return self.plan.pod(pod).netns

    def events(self, node: str) -> list[dict[str, Any]]:
        path = self.workdir / f"{node}.events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def status(self, node: str) -> dict[str, Any]:
        path = self.workdir / f"{node}.status.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def wait_closed(self, node: str, predicate: Any, timeout: float = 15.0) -> dict[str, Any]:
        """The first `closed` record on `node` matching predicate (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events(node):
                if ev["event"] == "closed" and predicate(ev):
                    return ev
            time.sleep(0.1)
        raise AssertionError(f"no matching closed record on {node}: {self.events(node)[-5:]}")

    def wait_status(self, node: str, predicate: Any, timeout: float = 15.0) -> dict[str, Any]:
        """The node's status once predicate(status) holds (the driver rewrites it every 0.2 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status(node)
            if st and predicate(st):
                return st
            time.sleep(0.1)
        raise AssertionError(f"status of {node} never matched: {self.status(node)}")

    @property
    def lookup_fail_file(self) -> Path:
        """While it exists, the proxies' on-demand lookups fail (the plane is unreachable)."""
        return self.workdir / "lookups-fail"

    def audit(self, node: str) -> list[dict[str, Any]]:
        path = self.workdir / f"{node}.audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text() if path.exists() else ""


def start(
    prefix: str,
    workdir: Path,
    nodes: int = 2,
    pods: int = 2,
    deny: Iterable[tuple[str, str]] = (),
    strict: Iterable[str] = (),
    extra_workloads: Iterable[dict[str, str]] = (),
    max_streams: int = 100,
    extra_nodes: dict[str, str] | None = None,
    enrolled: Iterable[str] | None = None,
    capture: str = "nft",
    policies: Iterable[dict[str, Any]] = (),
    engine_threads: int | None = None,
    connections_per_key: int | None = None,
    foreign: Iterable[str] = (),
    outbound_limit: int | None = None,
) -> ProxyLab:
    """Lab up, capture installed, one proxy per node and test servers in every pod, all ready.

    `enrolled`: the pods whose traffic is captured (all when None); the others talk plain TCP.
    `capture`: "nft" (tproxy rules installed here) or "bpf" (the proxy driver runs the Redirector).
    `policies`: policy documents (api.resources) decided by the product's PolicyEngine in every proxy.
    `engine_threads`, `connections_per_key`: the Proxy's knobs (None: its defaults).
    `outbound_limit`: each pod's outbound connection budget (None: the Proxy's default).
    `foreign`: nodes that run no ambit proxy (another HBONE implementation plays them, e.g. the fake
    ztunnel): their config (certificates) is written and the nftables capture installed, nothing started.
    """
    enrolled_pods = None if enrolled is None else set(enrolled)
    strict_uids = set(strict)
    plan = plan_lab(nodes, pods, prefix)
    control.up(plan)
    ca = CertificateAuthority.generate_root(TRUST_DOMAIN)
    lab = ProxyLab(prefix, plan, workdir, list(extra_workloads), ca, set(foreign))
    workloads = [
        {"name": p.name, "sa": service_account(p.name), "node": p.node, "ip": p.ip} for p in plan.pods()
    ] + lab.extra_workloads
    nodes_map = {n.name: n.ip for n in plan.nodes} | (extra_nodes or {})
    for node in plan.nodes:
        captured = [p for p in node.pods if enrolled_pods is None or p.name in enrolled_pods]
        redirect: dict[str, Any] | None = None
        if capture == "bpf" and node.name not in lab.foreign:
            pin_dir = str(pins.lab_pin_dir(prefix, node.name))
            enrol = [(p.ip, f"app/{p.name}", f"app/{p.name}" in strict_uids) for p in captured]
            redirect = {"pin_dir": pin_dir, "enrolled": enrol}
        else:
            install_capture(node.netns, [p.ip for p in captured])
        local = [w for w in workloads if w["node"] == node.name]
        cfg = {
            "node": node.name,
            "listen_ip": node.ip,
            "trust_domain": TRUST_DOMAIN,
            "workloads": workloads,
            "nodes": nodes_map,
            "pod_cidrs": {n.name: [n.pod_cidr] for n in plan.nodes},
            "service_cidrs": [SERVICE_CIDR],
            "lookup_fail_file": str(lab.lookup_fail_file),
            "audit": str(workdir / f"{node.name}.audit.jsonl"),
            "bundle_pem": ca.bundle_pem().decode(),
            "svids": {principal(w["name"]): issue(ca, SpiffeId.parse(principal(w["name"]))) for w in local},
            "deny": [list(d) for d in deny],
            "strict": sorted(strict_uids),
            "max_streams": max_streams,
            "policies": list(policies),
            "engine_threads": engine_threads,
            "connections_per_key": connections_per_key,
            "outbound_connections_per_source": outbound_limit,
            "services": [
                {"name": "echo", "ip": SERVICE_IP, "port": SERVICE_PORT, "target": ECHO, "selects": "pod-2-1"}
            ],
            "first_fetch_delay": 0.2,
            "idle_timeout": 3.0,  # pooled connections come and go during the run
            # The first node learns its peers on demand (like the relay's node-scoped view); the others hold
            # every workload, so their inbound side can name the source pod.
            "on_demand_peers": node.name == plan.nodes[0].name,
            "redirect": redirect,
            "events": str(workdir / f"{node.name}.events.jsonl"),
            "status": str(workdir / f"{node.name}.status.json"),
        }
        cfg_path = workdir / f"{node.name}.json"
        cfg_path.write_text(json.dumps(cfg))
        cfg_path.chmod(0o600)
        if node.name in lab.foreign:
            continue
        argv = [sys.executable, str(HERE / "proxy_driver.py"), str(cfg_path)]
        control.start_process(
            prefix, f"proxy-{node.name}", node.netns, argv, workdir / f"proxy-{node.name}.log"
        )
    # Test servers in every pod, and in the last node's own netns: a destination outside the mesh.
    outside = plan.nodes[-1]
    for name, netns in [(p.name, p.netns) for p in plan.pods()] + [(outside.name, outside.netns)]:
        argv = [sys.executable, str(HERE / "pod_servers.py")] + (["pod"] if name != outside.name else [])
        control.start_process(prefix, f"servers-{name}", netns, argv, workdir / f"servers-{name}.log")
    _wait_ready(lab)
    return lab


def _wait_ready(lab: ProxyLab, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    ours = [n for n in lab.plan.nodes if n.name not in lab.foreign]
    names = [f"proxy-{n.name}" for n in ours]
    while time.monotonic() < deadline:
        proxies = all(lab.status(n.name) for n in ours)
        servers = all("ready" in lab.log(f"servers-{p.name}") for p in lab.plan.pods())
        servers = servers and "ready" in lab.log(f"servers-{lab.plan.nodes[-1].name}")
        if proxies and servers:
            return
        time.sleep(0.1)
    logs = {n: lab.log(n)[-2000:] for n in names}
    raise RuntimeError(f"proxy lab not ready after {timeout}s: {logs}")


def stop(lab: ProxyLab) -> None:
    control.down(lab.prefix)


@contextlib.contextmanager
def running(prefix: str, workdir: Path, **kwargs: Any) -> Iterator[ProxyLab]:
    """start(prefix, workdir, **kwargs) for the block, torn down after it (also when start failed midway)."""
    started = None
    try:
        started = start(prefix, workdir, **kwargs)
        yield started
    finally:
        if started is not None:
            stop(started)
        else:
            control.down(prefix)


# --- clients, run inside a pod netns with agent.netns.run_in --------------------------------------


def request(ip: str, port: int, payload: bytes, timeout: float = 15.0) -> bytes:
    """Connect, send, half-close, read the answer to EOF."""
    return echo_roundtrip(ip, port, payload, timeout)


def pattern(size: int) -> tuple[bytes, int]:
    """A 1 MiB pseudo-random block repeated, so large transfers cost no RAM; returns (block, size)."""
    return hashlib.shake_256(b"ambit").digest(1 << 20), size


def send_and_hash(ip: str, port: int, size: int, timeout: float = 120.0) -> tuple[str, str]:
    """Stream `size` bytes to the hashing sink; returns (our sha256, the sink's answer)."""
    block, _ = pattern(size)
    digest = hashlib.sha256()
    view = memoryview(block)
    with socket.create_connection((ip, port), timeout=timeout) as sock:
        left = size
        while left:
            chunk = view[: min(left, len(block))]
            sock.sendall(chunk)
            digest.update(chunk)
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile("rb").readline().decode().strip()
    return f"{size} {digest.hexdigest()}", answer


def concurrent_echo(ip: str, port: int, count: int, timeout: float = 60.0) -> int:
    """Open `count` connections at once, each echoing a distinct message; returns how many matched."""
    sel = selectors.DefaultSelector()
    want: dict[socket.socket, bytes] = {}
    got: dict[socket.socket, bytearray] = {}
    for i in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((ip, port))
        want[sock] = f"stream {i:05d} ".encode() * 8
        got[sock] = bytearray()
        sel.register(sock, selectors.EVENT_WRITE)
    ok = 0
    deadline = time.monotonic() + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, mask in sel.select(1.0):
            sock = key.fileobj  # type: ignore[assignment]
            if mask & selectors.EVENT_WRITE:
                try:
                    sock.sendall(want[sock])
                except OSError:
                    sel.unregister(sock)
                    sock.close()
                    continue
                sel.modify(sock, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            got[sock] += data
            if not data or len(got[sock]) >= len(want[sock]):
                ok += bytes(got[sock]) == want[sock]
                sel.unregister(sock)
                sock.close()
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return ok


@dataclass
class _Upload:
    payload: bytes
    expect: bytes  # the sink's answer: "<length> <sha256>\n"
    got: bytearray = field(default_factory=bytearray)  # banner, then the answer
    sent: int = 0
    phase: str = "banner"  # banner -> upload -> answer


def banner_uploads(ip: str, port: int, count: int, size: int, timeout: float = 60.0) -> list[str]:
    """`count` concurrent clients, each: connect, read the server's banner, send `size` random bytes,
    half-close, read the server's "<length> <sha256>" of what it received. Returns the failures (empty when
    every byte of every upload arrived)."""
    sel = selectors.DefaultSelector()
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((ip, port))
        payload = os.urandom(size)
        expect = f"{size} {hashlib.sha256(payload).hexdigest()}\n".encode()
        sel.register(sock, selectors.EVENT_READ, _Upload(payload, expect))
    failures: list[str] = []
    deadline = time.monotonic() + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, mask in sel.select(1.0):
            sock, st = key.fileobj, key.data  # type: ignore[assignment]
            try:
                if mask & selectors.EVENT_READ:
                    data = sock.recv(65536)  # type: ignore[union-attr]
                    st.got += data
                    if st.phase == "banner" and len(st.got) >= len(BANNER):
                        if bytes(st.got) != BANNER:
                            raise ValueError(f"banner {bytes(st.got)!r}")
                        st.got.clear()
                        st.phase = "upload"
                        sel.modify(sock, selectors.EVENT_WRITE, st)
                        continue
                    if not data:
                        if st.phase != "answer" or bytes(st.got) != st.expect:
                            raise ValueError(f"{st.phase}: got {bytes(st.got)!r}, want {st.expect!r}")
                        sel.unregister(sock)
                        sock.close()  # type: ignore[union-attr]
                if mask & selectors.EVENT_WRITE and st.phase == "upload":
                    st.sent += sock.send(memoryview(st.payload)[st.sent :])  # type: ignore[union-attr]
                    if st.sent == len(st.payload):
                        sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
                        st.phase = "answer"
                        sel.modify(sock, selectors.EVENT_READ, st)
            except (OSError, ValueError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                sel.unregister(sock)
                sock.close()  # type: ignore[union-attr]
    for key in list(sel.get_map().values()):
        failures.append(f"timed out in {key.data.phase}")
        key.fileobj.close()  # type: ignore[union-attr]
    return failures


def hold_streams(ip: str, port: int, count: int, hold: float, timeout: float = 15.0) -> int:
    """Open `count` echo connections at once, each answering one byte, keep them `hold` seconds, close them;
    returns how many answered."""
    socks = [socket.create_connection((ip, port), timeout=timeout) for _ in range(count)]
    try:
        ok = 0
        for sock in socks:
            sock.sendall(b"x")
            ok += sock.recv(1) == b"x"
        time.sleep(hold)
        return ok
    finally:
        for sock in socks:
            sock.close()


def connect_and_read(ip: str, port: int, payload: bytes = b"x", timeout: float = 10.0) -> str:
    """What a client observes: 'data:<bytes>', 'eof' or 'reset'."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as sock:
            sock.sendall(payload)
            data = sock.recv(65536)
            return f"data:{data.decode(errors='replace')}" if data else "eof"
    except ConnectionResetError:
        return "reset"
    except ConnectionRefusedError:
        return "refused"


@dataclass(frozen=True)
class Client:
    """An HBONE client identity of the test's choosing (a real SVID, or one `tests.forge` made)."""

    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes


def hbone_stream(pod_ip: str, expected_peer: str, client: Client, authority: str, forwarded: str = "") -> str:
    """One CONNECT from `client` to the agent serving `pod_ip`:15008 (requiring `expected_peer`, the pod's
    SVID), through the real engine (run it in a netns); sends b"x", half-closes. Returns "200 <answer>",
    "refused <status>" or "failed <why>"."""
    import select as select_

    from native.engine import Engine

    engine = Engine(threads=1)
    engine.start()
    try:
        ctx = engine.tls_context(
            server=False, chain_pem=client.chain_pem, key_pem=client.key_pem, bundle_pem=client.bundle_pem
        )
        sock = socket.create_connection((pod_ip, HBONE_PORT), timeout=10)
        conn = engine.connect_hbone(sock.detach(), ctx, expected_peer)
        app, local = socket.socketpair()
        engine.open_stream(conn, authority, local.detach(), tag=7, forwarded=forwarded)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for ev in engine.events():
                if ev.kind == "stream_open" and ev.tag == 7:
                    app.settimeout(10)
                    app.sendall(b"x")
                    app.shutdown(socket.SHUT_WR)
                    answer = b"".join(iter(lambda: app.recv(65536), b""))
                    return f"200 {answer.decode(errors='replace').strip()}"
                if ev.kind == "stream_refused" and ev.tag == 7:
                    return f"refused {ev.status}"
                if ev.kind in ("conn_error", "stream_closed", "conn_closed"):
                    return f"failed {ev.kind}: {ev.detail}"
            select_.select([engine.eventfd], [], [], 0.5)
        return "failed: timeout"
    finally:
        engine.stop()


def in_pod(lab: ProxyLab, pod: str, fn: Any, *args: Any, timeout: float = 120.0) -> Any:
    return nsx.run_in(lab.pod_netns(pod), fn, *args, timeout=timeout)


def environ_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))
