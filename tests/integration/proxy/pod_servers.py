"""Test servers run inside a lab pod (python pod_servers.py): echo, hashing sink, reset, whoami, count sink,
banner + hashing sink.

Plain blocking sockets, one thread per connection: the servers must be obviously correct, not fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import sys
import threading
from collections.abc import Callable

ECHO, SHA_SINK, RESET, WHOAMI, COUNT_SINK, BANNER_SHA = 8080, 8081, 8082, 8083, 8084, 8085
BANNER = b"ambit-banner\n"
HBONE_PORT = 15008  # agent.redirect.marks.HBONE_PORT (this script runs without the project on its path)
BUF = 1 << 20


def _echo(conn: socket.socket) -> None:
    buf = bytearray(65536)
    while n := conn.recv_into(buf):
        conn.sendall(memoryview(buf)[:n])


def _drain(conn: socket.socket, digest: hashlib._Hash | None) -> int:
    buf = bytearray(BUF)
    view = memoryview(buf)
    total = 0
    while n := conn.recv_into(buf):
        total += n
        if digest is not None:
            digest.update(view[:n])
    return total


def _sha_sink(conn: socket.socket) -> None:
    """Reads to EOF (the client half-closed), then answers over the still-open other half."""
    digest = hashlib.sha256()
    total = _drain(conn, digest)
    conn.sendall(f"{total} {digest.hexdigest()}\n".encode())


def _banner_sha(conn: socket.socket) -> None:
    """Speaks first (a banner, as SMTP or SSH servers do), then is a hashing sink."""
    conn.sendall(BANNER)
    _sha_sink(conn)


def _count_sink(conn: socket.socket) -> None:
    conn.sendall(f"{_drain(conn, None)}\n".encode())


def _reset(conn: socket.socket) -> None:
    conn.settimeout(5)
    with contextlib.suppress(TimeoutError):
        conn.recv(1)
    # SO_LINGER with a zero timeout turns close() into an RST.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _whoami(conn: socket.socket) -> None:
    ip, port = conn.getpeername()[:2]
    conn.sendall(f"{ip} {port}\n".encode())


HANDLERS: dict[int, Callable[[socket.socket], None]] = {
    ECHO: _echo,
    SHA_SINK: _sha_sink,
    RESET: _reset,
    WHOAMI: _whoami,
    COUNT_SINK: _count_sink,
    BANNER_SHA: _banner_sha,
}


def _serve_one(conn: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    try:
        handler(conn)
    except OSError:
        pass
    finally:
        conn.close()


def _accept_loop(lst: socket.socket, handler: Callable[[socket.socket], None]) -> None:
    while True:
        conn, _ = lst.accept()
        threading.Thread(target=_serve_one, args=(conn, handler), daemon=True).start()


# In pods only (a node's netns has the proxy on 15008): what a ztunnel-style peer would dial. The proxy must
# never relay plaintext here, so an echo answering proves that it did.
POD_HANDLERS = {HBONE_PORT: _echo}


def main() -> None:
    threading.stack_size(256 * 1024)
    threads = []
    handlers = HANDLERS | (POD_HANDLERS if sys.argv[1:] == ["pod"] else {})
    for port, handler in handlers.items():
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("0.0.0.0", port))
        lst.listen(4096)
        t = threading.Thread(target=_accept_loop, args=(lst, handler), daemon=True)
        t.start()
        threads.append(t)
    print("ready", flush=True)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
