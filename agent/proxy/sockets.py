"""Sockets the proxy opens itself: transparent listeners, original destinations, upstream connects.

The engine owns every socket once it is handed over (by file descriptor); this module only creates and
configures them. All sockets are non-blocking: a connect in progress is watched by the proxy's loop and
handed to the engine once the kernel reports it established (SO_ERROR == 0).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import re
import socket

from agent.redirect.marks import AGENT_SOCKET_MARK

# IP_TRANSPARENT lets a listener accept connections addressed to any IP (tc/tproxy steered them here) and
# lets an upstream socket bind a non-local source address (the client pod's IP). Needs CAP_NET_ADMIN.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
# The port of a socket bound to (ip, 0) is picked at connect, unique per 4-tuple, not reserved at bind against
# every destination (a bind(ip, 0) skips every port that ip's TIME_WAIT sockets hold: see docs/engine.md).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
LISTEN_BACKLOG = 4096


class AuthorityError(ValueError):
    pass


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET


def listener(ip: str, port: int, transparent: bool) -> socket.socket:
    """A non-blocking listening socket on ip:port (port 0 picks one)."""
    sock = socket.socket(_family(ip), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind((ip, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def original_destination(accepted: socket.socket) -> tuple[str, int]:
    """Where the client meant to connect: with sk_assign/tproxy the accepted socket keeps that address."""
    ip, port = accepted.getsockname()[:2]
    return str(ip), int(port)


def peer_address(accepted: socket.socket) -> tuple[str, int]:
    ip, port = accepted.getpeername()[:2]
    return str(ip), int(port)


def connect_nonblocking(
    destination: tuple[str, int], source_ip: str | None = None, mark: int = AGENT_SOCKET_MARK
) -> socket.socket:
    """Start a TCP connect the agent originates.

    SO_MARK tells the redirect programs never to capture it again. With `source_ip` the socket binds the
    client's address (IP_TRANSPARENT) so the destination sees the real client; the replies come back to this
    socket because the redirect's socket lookup (or nftables `socket transparent`) assigns them to it.
    """
    ip, port = destination
    sock = socket.socket(_family(ip), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_ip is not None:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        sock.setblocking(False)
        rc = sock.connect_ex((ip, port))
        if rc not in (0, errno.EINPROGRESS):
            raise OSError(rc, f"connect to {ip}:{port}: {errno.errorcode.get(rc, rc)}")
    except BaseException:
        sock.close()
        raise
    return sock


def connect_result(sock: socket.socket) -> int:
    """0 once a non-blocking connect succeeded, else its errno (read when the socket turns writable)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


_PORT = re.compile(r"[1-9][0-9]{0,4}")


def format_authority(ip: str, port: int) -> str:
    """CONNECT authority for a pod address: "ip:port", "[v6]:port"."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@functools.lru_cache(maxsize=4096)  # streams to a pod name the same few authorities; refusals: not cached
def parse_authority(text: str) -> tuple[str, int]:
    """Parse a CONNECT authority that must be a literal IP and a port (HBONE never carries host names)."""
    if len(text) > 64:
        raise AuthorityError(f"authority too long ({len(text)} characters)")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host or _PORT.fullmatch(port_text) is None:
        # Only canonical ASCII decimal: str.isdigit() also takes "08080" (two spellings of one port) and
        # Unicode digits such as "²" that int() then rejects.
        raise AuthorityError(f"authority {text!r} is not ip:port")
    if "%" in host:  # a scoped address names an interface of the sender's host, never a pod
        raise AuthorityError(f"authority {text!r}: zone IDs are not allowed")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise AuthorityError(f"authority {text!r} does not name an IP address") from None
    if (addr.version == 6) != text.startswith("["):
        raise AuthorityError(f"authority {text!r}: IPv6 addresses must be bracketed")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise AuthorityError(f"authority {text!r}: port out of range")
    return str(addr), port
