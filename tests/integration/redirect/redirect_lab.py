"""Lab helpers for the redirection tests and bench: processes that play the agent, the proxy's listeners,
pods' servers and clients, and a packet capture on a node's uplink.

Each role is a separate interpreter started inside its namespace (`python -m <this module> ROLE ...`),
so a test can stop one (the agent, the listener) while the others keep their sockets. Roles talk JSON
lines on stdout (and take commands on stdin where they have any).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Self

from agent import netns as nsx
from agent.lab import control
from agent.lab.plan import LabPlan, plan_lab
from agent.redirect import marks, pins

IP_TRANSPARENT = 19  # linux/in.h
MODULE = "tests.integration.redirect.redirect_lab"
ROOT = Path(__file__).resolve().parents[3]


# -- roles (run inside a namespace) ----------------------------------------------------------------------


def _emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _echo(conn: socket.socket, tag: str) -> None:
    """Greets with the server's tag (so a client knows who answered), then echoes."""
    with conn:
        conn.sendall(tag.encode() + b"\n")
        _pump(conn, conn)


def _forward(conn: socket.socket, peer: tuple[str, int], orig_dst: tuple[str, int]) -> None:
    """What the proxy does for plaintext: connect to the original destination as the client, splice."""
    up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    up.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, marks.AGENT_SOCKET_MARK)
    up.bind((peer[0], 0))
    try:
        up.connect(orig_dst)
    except OSError as exc:
        _emit({"event": "forward_failed", "error": str(exc)})
        conn.close()
        up.close()
        return
    threading.Thread(target=_pump, args=(up, conn), daemon=True).start()
    _pump(conn, up)


def serve(port: int, tag: str, transparent: bool, mode: str) -> None:
    """A listener in this netns: `echo` (greets and echoes) or `forward` (splices to the original dst)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent:
        srv.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(128)
    _emit({"event": "ready"})
    while True:
        conn, peer = srv.accept()
        orig_dst = conn.getsockname()
        _emit({"event": "accept", "peer": list(peer), "orig_dst": list(orig_dst)})
        if mode == "forward":
            threading.Thread(target=_forward, args=(conn, peer, orig_dst), daemon=True).start()
            continue
        if mode == "reset":
            # Linger 0: when this process dies the kernel resets the connection and frees the socket
            # at once (a FIN would leave it in FIN_WAIT, still catching the pod's packets).
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        threading.Thread(target=_echo, args=(conn, tag), daemon=True).start()


def client(ip: str, port: int) -> None:
    """A long-lived connection: reads the greeting, then each stdin line is sent and its echo printed."""
    with socket.create_connection((ip, port), timeout=5) as conn:
        reader = conn.makefile("rb")
        _emit({"event": "greeting", "tag": reader.readline().decode().strip()})
        for line in sys.stdin:
            try:
                conn.sendall(line.encode())
                _emit({"event": "echo", "data": reader.readline().decode()})
            except OSError as exc:
                _emit({"event": "error", "error": str(exc)})


def agent(node: str, pin_dir: str) -> None:
    """The Redirector driven over stdin: {"op": "start"|"enroll"|"unenroll"|"stop"|..., "args": [...]}."""
    from agent.redirect.maps import PodEntry
    from agent.redirect.redirector import Redirector

    redirector = Redirector(node, Path(pin_dir))
    for line in sys.stdin:
        request = json.loads(line)
        try:
            args = request.get("args", [])
            if request["op"] == "sync":  # JSON has no PodEntry: {ip: [workload, strict]}
                args = [{ip: PodEntry(w, strict) for ip, (w, strict) in args[0].items()}]
            result = getattr(redirector, request["op"])(*args)
            if is_dataclass(result):
                result = asdict(result)  # type: ignore[arg-type]
            if isinstance(result, dict):
                result = {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in result.items()}
            _emit({"ok": True, "result": result})
        except Exception as exc:
            _emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        if request["op"] == "stop":
            return


def capture(ifname: str, needles: list[str]) -> None:
    """Counts frames on `ifname` and which needles appear in them, until stdin closes."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.bind((ifname, 0))
    sock.setblocking(False)
    seen = {n: 0 for n in needles}
    frames = 0
    _emit({"event": "ready"})
    done = False
    while not done:
        readable, _, _ = select.select([sock, sys.stdin], [], [], 1.0)
        done = sys.stdin in readable and not sys.stdin.readline()
        # Drain what is queued (also after stdin closed: frames that passed before the test stopped us).
        while True:
            try:
                frame = sock.recv(65536)
            except BlockingIOError:
                break
            frames += 1
            for n in needles:
                seen[n] += frame.count(n.encode())
    _emit({"event": "result", "frames": frames, "seen": seen})


def send_raw_segment(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
    """One hand-made TCP segment (ACK|PSH) of an existing flow, as a pod would send mid-connection."""
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], 1, 1, 5 << 4, 0x18, 65535, 0, 0)
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, socket.IPPROTO_TCP, 0,
        socket.inet_aton(src[0]), socket.inet_aton(dst[0]),
    )  # fmt: skip
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(ip + tcp + payload, (dst[0], 0))


def sink(port: int) -> None:
    """Receives connections one at a time and reports how many bytes each carried and for how long."""
    srv = socket.create_server(("0.0.0.0", port))
    _emit({"event": "ready"})
    buf = bytearray(1 << 20)
    while True:
        conn, _ = srv.accept()
        with conn:
            total = conn.recv_into(buf)
            started = time.monotonic()
            while n := conn.recv_into(buf):
                total += n
            _emit({"event": "received", "bytes": total, "seconds": time.monotonic() - started})


def blast(ip: str, port: int, seconds: float) -> None:
    """Sends as fast as one connection goes for `seconds` (run in a pod with run_in)."""
    chunk = b"\0" * (1 << 20)
    with socket.create_connection((ip, port), timeout=10) as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.sendall(chunk)


def main(argv: list[str]) -> None:
    role, *args = argv
    if role == "serve":
        serve(int(args[0]), args[1], args[2] == "transparent", args[3])
    elif role == "client":
        client(args[0], int(args[1]))
    elif role == "agent":
        agent(args[0], args[1])
    elif role == "sink":
        sink(int(args[0]))
    elif role == "capture":
        capture(args[0], args[1:])
    else:
        raise SystemExit(f"unknown role {role!r}")


# -- test side --------------------------------------------------------------------------------------------


class Role:
    """A role running in a namespace, with its JSON-lines output collected by a thread."""

    def __init__(self, netns: str, *args: str) -> None:
        self.netns = netns
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = nsx.popen_in(
            netns,
            [sys.executable, "-m", MODULE, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def next_event(self, timeout: float = 20.0) -> dict[str, Any]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.proc.args!r} in {self.netns}: no output (rc {self.proc.poll()})"
            ) from None

    def wait_for(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.next_event(max(0.1, deadline - time.monotonic()))
            if got.get("event") == event:
                return got

    def drain(self) -> list[dict[str, Any]]:
        out = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out

    def send_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Listener(Role):
    def __init__(
        self, netns: str, port: int, tag: str, *, transparent: bool = True, mode: str = "echo"
    ) -> None:
        super().__init__(netns, "serve", str(port), tag, "transparent" if transparent else "plain", mode)
        self.wait_for("ready")

    def accepts(self) -> list[dict[str, Any]]:
        return [e for e in self.drain() if e.get("event") == "accept"]


class Client(Role):
    """One long-lived connection from a pod: `roundtrip` proves it still carries data both ways."""

    def __init__(self, netns: str, ip: str, port: int) -> None:
        super().__init__(netns, "client", ip, str(port))
        self.greeting = self.wait_for("greeting")["tag"]

    def roundtrip(self, text: str) -> str:
        self.send_line(text)
        got = self.next_event(10)
        if got.get("event") != "echo":
            raise AssertionError(f"connection broke: {got}")
        return str(got["data"]).rstrip("\n")


class Agent(Role):
    """The Redirector in a node's netns, one call at a time."""

    def __init__(self, netns: str, node: str, pin_dir: Path) -> None:
        super().__init__(netns, "agent", node, str(pin_dir))

    def call(self, op: str, *args: Any) -> Any:
        self.send_line(json.dumps({"op": op, "args": list(args)}))
        reply = self.next_event(60)
        if not reply["ok"]:
            raise AssertionError(f"{op}{args}: {reply['error']}")
        if op == "stop":
            self.proc.wait(timeout=10)
        return reply["result"]


class Sink(Role):
    def __init__(self, netns: str, port: int) -> None:
        super().__init__(netns, "sink", str(port))
        self.wait_for("ready")

    def gbits(self, src_netns: str, ip: str, port: int, seconds: float) -> float:
        """One stream from a pod to this sink for `seconds`: its throughput in Gbit/s."""
        nsx.run_in(src_netns, blast, ip, port, seconds, timeout=seconds + 30)
        got = self.wait_for("received")
        return float(got["bytes"]) * 8 / float(got["seconds"]) / 1e9


class Capture(Role):
    def __init__(self, netns: str, ifname: str, needles: list[str]) -> None:
        super().__init__(netns, "capture", ifname, *needles)
        self.wait_for("ready")

    def result(self) -> dict[str, Any]:
        self.close_stdin()
        return self.wait_for("result")


@contextlib.contextmanager
def two_node_lab(prefix: str) -> Iterator[LabPlan]:
    """Two nodes with two pods each; down (and the agents' pins gone) afterwards."""
    plan = plan_lab(2, 2, prefix)
    control.up(plan)
    try:
        yield plan
    finally:
        control.down(prefix)
        pins.cleanup_pins(prefix)


def greeting_of(netns: str, ip: str, port: int, timeout: float = 3.0) -> str:
    """Connect from a pod, return who answered (the server's greeting tag); raises OSError on failure."""
    return nsx.run_in(netns, _greeting, ip, port, timeout)


def _greeting(ip: str, port: int, timeout: float) -> str:
    with socket.create_connection((ip, port), timeout=timeout) as conn:
        return conn.makefile("rb").readline().decode().strip()


if __name__ == "__main__":
    main(sys.argv[1:])
