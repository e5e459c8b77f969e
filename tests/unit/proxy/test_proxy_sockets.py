import errno
import select
import socket

import pytest

from agent.proxy.sockets import (
    AuthorityError,
    connect_nonblocking,
    connect_result,
    format_authority,
    listener,
    original_destination,
    parse_authority,
    peer_address,
)
from agent.redirect.marks import AGENT_SOCKET_MARK


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.244.1.2:8080", ("10.244.1.2", 8080)),
        ("[fd00::1]:443", ("fd00::1", 443)),
        ("1.2.3.4:65535", ("1.2.3.4", 65535)),
    ],
)
def test_parse_authority(text: str, expected: tuple[str, int]) -> None:
    assert parse_authority(text) == expected
    assert parse_authority(format_authority(*expected)) == expected


@pytest.mark.parametrize(
    "text",
    ["", "10.244.1.2", "host:80", "10.244.1.2:0", "10.244.1.2:65536", "10.244.1.2:-1", "fd00::1:80",
     "[10.0.0.1]:80", "10.0.0.1:80x", "1.2.3.4:" + "9" * 70, "[fd00::1]80",
     # malformed ports: leading zeros, signs, spaces, non-ASCII digits, out of range, empty
     "10.244.1.2:08080", "10.244.1.2:00080", "10.244.1.2:00", "10.244.1.2:+80", "10.244.1.2: 80",
     "10.244.1.2:80 ", "10.244.1.2:8 0", "10.244.1.2:\u00b2", "10.244.1.2:\u0668\u0660", "10.244.1.2:99999",
     "10.244.1.2:", "[fd00::1]:", "[fd00::1]:080", "[fd00::1]:65536",
     # malformed hosts: spaces, IPv4 leading zeros, zone IDs, unbracketed or half-bracketed IPv6
     " 10.244.1.2:80", "010.244.1.2:80", "[fe80::1%eth0]:80", "fe80::1%eth0:80", "::1:80", "[::1:80",
     "::1]:80", "[]:80", ":80"],
)  # fmt: skip
def test_parse_authority_rejects(text: str) -> None:
    for _ in range(2):  # parses are cached: a refusal is not, it stays a refusal
        with pytest.raises(AuthorityError):
            parse_authority(text)


def test_listener_and_addresses() -> None:
    lst = listener("127.0.0.1", 0, transparent=False)
    try:
        port = lst.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        lst.setblocking(True)
        server, _ = lst.accept()
        assert original_destination(server) == ("127.0.0.1", port)
        assert peer_address(server) == client.getsockname()
        server.close()
        client.close()
    finally:
        lst.close()


@pytest.mark.root
def test_transparent_listener_and_marked_connect() -> None:
    lst = listener("127.0.0.1", 0, transparent=True)
    try:
        sock = connect_nonblocking(lst.getsockname())
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == AGENT_SOCKET_MARK
        select.select([], [sock], [], 5)
        assert connect_result(sock) == 0
        sock.close()
    finally:
        lst.close()


@pytest.mark.root
def test_connect_refused_is_reported() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    sock = connect_nonblocking(("127.0.0.1", port))
    select.select([], [sock], [], 5)
    assert connect_result(sock) == errno.ECONNREFUSED
    sock.close()
