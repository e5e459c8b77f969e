"""An agent started right after another stopped binds every port at once, TIME_WAIT or not (a DaemonSet
rolling restart): the proxy listeners and the HTTP services all set SO_REUSEADDR."""

from __future__ import annotations

import socket

from agent.observe.servers import ReadinessServer
from agent.proxy.sockets import listener


def test_proxy_listener_rebinds_over_time_wait() -> None:
    first = listener("127.0.0.1", 0, transparent=False)
    port = first.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    first.setblocking(True)
    accepted, _ = first.accept()
    accepted.close()  # the server closes first: its side of the connection enters TIME_WAIT
    client.close()
    first.close()
    again = listener("127.0.0.1", port, transparent=False)  # EADDRINUSE without SO_REUSEADDR
    assert again.getsockname()[1] == port
    again.close()


def test_http_service_rebinds_over_time_wait() -> None:
    first = ReadinessServer("127.0.0.1:0")
    first.set_ready()
    first.start()
    port = first.port
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"GET /healthz/ready HTTP/1.0\r\n\r\n")
        answer = b""
        while data := client.recv(4096):  # EOF: the server closed first, its side is in TIME_WAIT
            answer += data
    assert answer.startswith(b"HTTP/1.0 200")
    first.stop()
    second = ReadinessServer(f"127.0.0.1:{port}")
    second.start()
    assert second.port == port
    second.stop()
