"""The WAF corpus replayed through a gateway over real sockets, byte for byte, and a small HTTP/1.1
backend that answers every request it is sent (so "reached the backend" is observable). Shared by the
gateway tests (vendored sample rows) and `python -m tests.bench gateway` (the full corpus when present)."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent / "unit" / "gateway" / "data" / "waf_sample.jsonl"
FULL_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "waf"
BACKEND_MARK = b"x-backend: reached"


def load_rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def full_corpus_rows() -> list[dict[str, object]] | None:
    for base in (FULL_CORPUS, Path("/work/shared/corpora/waf")):
        if (base / "attacks.jsonl").exists():
            return load_rows(base / "attacks.jsonl") + load_rows(base / "benign.jsonl")
    return None


def raw_request(row: dict[str, object]) -> bytes:
    """The row's bytes as the CRS test harness sends them: a body without Content-Type is form data."""
    headers = dict(row["headers"])  # type: ignore[call-overload]
    body = str(row["body"]).encode()
    if body and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    head = f"{row['method']} {row['path']} {row['version']}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


def exchange(port: int, raw: bytes, timeout: float = 10.0, host: str = "127.0.0.1") -> bytes:
    """Sends `raw`, half-closes, returns everything the gateway answered until it closed."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def status_of(response: bytes) -> int:
    try:
        return int(response.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


@dataclass
class Replay:
    """Per-category outcome: attacks must be refused, benign requests must reach the backend."""

    attacks: Counter[str] = field(default_factory=Counter)
    attacks_blocked: Counter[str] = field(default_factory=Counter)
    benign: Counter[str] = field(default_factory=Counter)
    benign_blocked: Counter[str] = field(default_factory=Counter)
    misses: list[str] = field(default_factory=list)

    def add(self, row: dict[str, object], response: bytes) -> None:
        cat = str(row["category"])
        reached = BACKEND_MARK in response.split(b"\r\n\r\n", 1)[0].lower()
        status = status_of(response)
        if row["expect"] == "block":
            self.attacks[cat] += 1
            # refused by the gateway (WAF 403, or a protocol refusal), not lost to a missing route
            if not reached and 400 <= status < 500 and status != 404:
                self.attacks_blocked[cat] += 1
            else:
                self.misses.append(f"attack not blocked: {row['id']} -> {status}")
        else:
            self.benign[cat] += 1
            if reached:
                return
            self.benign_blocked[cat] += 1
            self.misses.append(f"benign blocked: {row['id']} -> {status}")

    def attack_rate(self) -> float:
        return sum(self.attacks_blocked.values()) / max(1, sum(self.attacks.values()))

    def benign_block_rate(self) -> float:
        return sum(self.benign_blocked.values()) / max(1, sum(self.benign.values()))

    def table(self) -> str:
        lines = ["| category | attacks blocked | benign blocked |", "|---|---|---|"]
        for cat in sorted(set(self.attacks) | set(self.benign)):
            a = f"{self.attacks_blocked[cat]}/{self.attacks[cat]}" if self.attacks[cat] else "-"
            b = f"{self.benign_blocked[cat]}/{self.benign[cat]}" if self.benign[cat] else "-"
            lines.append(f"| {cat} | {a} | {b} |")
        lines.append(
            f"| **total** | {sum(self.attacks_blocked.values())}/{sum(self.attacks.values())} "
            f"({self.attack_rate():.1%}) | {sum(self.benign_blocked.values())}/"
            f"{sum(self.benign.values())} ({self.benign_block_rate():.1%}) |"
        )
        return "\n".join(lines)


def replay(port: int, rows: Iterable[dict[str, object]]) -> Replay:
    result = Replay()
    for row in rows:
        result.add(row, exchange(port, raw_request(row)))
    return result


class Backend:
    """A keep-alive HTTP/1.1 server on loopback: 200 with `x-backend: reached` for every request; keeps
    the heads it saw (bounded) so tests can check what the gateway forwarded."""

    MAX_SEEN = 1000

    def __init__(self, host: str = "127.0.0.1", port: int = 0, body: bytes = b"ok\n") -> None:
        self.body = body
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.seen: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = False
        if port == 0:
            threading.Thread(target=self._accept, daemon=True).start()

    def serve_forever(self) -> None:
        self._accept()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                while len(buf) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                buf = buf[length:]
                with self._lock:
                    if len(self.seen) < self.MAX_SEEN:
                        self.seen.append(head)
                is_head = head.startswith(b"HEAD ")
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\n"
                    + BACKEND_MARK
                    + b"\r\ncontent-length: %d\r\n\r\n" % len(self.body)
                    + (b"" if is_head else self.body)
                )

    def close(self) -> None:
        self._stop = True
        self.sock.close()
