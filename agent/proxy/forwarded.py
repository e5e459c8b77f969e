"""The source pod a peer node claims for an HBONE stream: the CONNECT's `forwarded` header (RFC 7239).

Strict on purpose. Accepted: one element (no comma list) of `;`-separated pairs with exactly one `for=` and
at most one `host=` (ztunnel adds the destination service's name), nothing else. The `for` node is an IP
address with an optional port, in the forms our engine and ztunnel send: `for=10.244.1.2`,
`for="10.244.1.2"`, `for="10.244.1.2:43210"`, `for="[fd00::2]"`, `for="[fd00::2]:43210"` (a port or an IPv6
address needs the quoted-string; IPv6 is bracketed). Refused: other parameters, repeated ones, empty pairs,
quoted-pairs (backslashes), obfuscated names and ports (`_x`, `unknown`), zones, port 0 or leading zeros,
loopback/unspecified/multicast addresses and anything malformed; the caller then treats the header as absent.
An IPv4-mapped IPv6 address (`[::ffff:10.244.1.2]`) is the IPv4 address, so ipBlocks see what they name.
Whether a well-formed claim is believed is `believe` (docs/proxy.md, "Source address").
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Protocol

from api.resources.workload import Workload
from api.spiffe import SpiffeId

MAX_LENGTH = 255  # the engine never hands over more (longer headers arrive as an invalid marker)

# RFC 7239: forwarded-pair = token "=" value; value = token / quoted-string (RFC 7230). No whitespace
# around "=" or ";". A quoted-string here has no quoted-pair: no IP or host name needs one.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PAIR = re.compile(rf'({_TOKEN})=(?:"([^"\\]*)"|({_TOKEN}))')
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_HOST = re.compile(r"(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})(?::[1-9][0-9]{0,4})?")
_ALLOWED = ("for", "host")


class ForwardedError(ValueError):
    """The header is present but is not one valid `for=<ip>[:port]` claim."""


@dataclass(frozen=True)
class Forwarded:
    ip: str  # normalized
    port: int | None = None  # the client's source port, when the peer sent it (ztunnel does)
    host: str | None = None  # the destination service name, when the peer sent it (ztunnel does)


def parse_forwarded(value: str) -> Forwarded | None:
    """The claim in `value`, None when the header is absent (""); ForwardedError for anything else."""
    if not value:
        return None
    if len(value) > MAX_LENGTH or not value.isascii():
        raise ForwardedError("forwarded header too long or not ASCII")
    pairs: dict[str, str] = {}
    quoted: dict[str, bool] = {}
    for pair in value.strip(" \t").split(";"):
        m = _PAIR.fullmatch(pair)
        if m is None:
            raise ForwardedError(f"forwarded header is not a list of name=value pairs: {value[:64]!r}")
        name = m.group(1).lower()
        if name not in _ALLOWED:
            raise ForwardedError(f"forwarded parameter {name[:16]!r} is not accepted (only for, host)")
        if name in pairs:
            raise ForwardedError(f"forwarded parameter {name!r} repeated")
        quoted[name] = m.group(2) is not None
        pairs[name] = m.group(2) if m.group(2) is not None else m.group(3)
    if "for" not in pairs:
        raise ForwardedError("forwarded header has no for= pair")
    host = pairs.get("host")
    if host is not None and _HOST.fullmatch(host) is None:
        raise ForwardedError(f"forwarded host is not a host name: {host[:64]!r}")
    ip, port = _node(pairs["for"], quoted["for"])
    return Forwarded(ip, port, host)


def parse_forwarded_for(value: str) -> str | None:
    """The IP address claimed by `value` (normalized), None when the header is absent ("").

    Raises ForwardedError for anything but one `for=<ip>[:port]` claim (see the module docstring).
    """
    claim = parse_forwarded(value)
    return claim.ip if claim is not None else None


def _node(node: str, quoted: bool) -> tuple[str, int | None]:
    port_text: str | None = None
    if node.startswith("["):  # IPv6 is bracketed, so quoted (RFC 7239 section 6): "[v6]" or "[v6]:port"
        text, bracket, rest = node[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ForwardedError(f"forwarded IPv6 node not bracketed: {node[:64]!r}")
        port_text = rest[1:] if rest else None
        version = 6
    else:
        text, colon, port_part = node.rpartition(":") if ":" in node else (node, "", "")
        port_text = port_part if colon else None
        version = 4
    if port_text is not None and not quoted:
        raise ForwardedError("forwarded node with a port must be quoted")
    port = None
    if port_text is not None:
        if _PORT.fullmatch(port_text) is None or int(port_text) > 65535:
            raise ForwardedError(f"forwarded port is not 1-65535: {port_text[:16]!r}")
        port = int(port_text)
    if "%" in text:
        raise ForwardedError("forwarded address has a zone")
    address, fault = _address(text, version)
    if fault is _Fault.NOT_AN_IP:
        raise ForwardedError(f"forwarded node is not an IP address: {node[:64]!r}")
    if fault is _Fault.BRACKETING:
        raise ForwardedError(f"forwarded node {node[:64]!r}: IPv6 must be bracketed, IPv4 must not")
    if fault is _Fault.NOT_A_POD:
        raise ForwardedError(f"forwarded address {address} cannot be a pod")
    return address, port


class _Fault(enum.Enum):
    NONE = "none"
    NOT_AN_IP = "not_an_ip"
    BRACKETING = "bracketing"
    NOT_A_POD = "not_a_pod"


@functools.lru_cache(maxsize=4096)  # a peer claims the same few pod addresses stream after stream
def _address(text: str, version: int) -> tuple[str, _Fault]:
    """(`text` normalized, what is wrong with it as a pod's address of IP `version`): a pure function of
    its arguments, so its verdicts, refusals included, are cached."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return text, _Fault.NOT_AN_IP
    if addr.version != version:
        return text, _Fault.BRACKETING
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket's view of an IPv4 client: policies see the IPv4 address
    if addr.is_unspecified or addr.is_loopback or addr.is_multicast:
        return str(addr), _Fault.NOT_A_POD
    return addr.compressed, _Fault.NONE


class ClaimView(Protocol):
    @property
    def trust_domain(self) -> str: ...

    def workload_by_ip(self, ip: str) -> Workload | None: ...

    def is_node_address(self, ip: str) -> bool: ...


class Belief(enum.Enum):
    BELIEVED = "believed"  # the address of a workload whose identity is exactly the peer's
    UNKNOWN = "unknown"  # no workload known at the address (after a lookup)
    OTHER_IDENTITY = "other_identity"  # a workload of another identity: the peer does not hold it
    NODE_ADDRESS = "node_address"  # a node's address (hostNetwork workloads share it): nobody's alone


def believe(ip: str, peer: SpiffeId, view: ClaimView) -> tuple[Belief, Workload | None]:
    """Whether the authenticated `peer` may claim `ip` as its source, and the workload known there.

    The claim is the peer node's word, so it is believed only when `ip` is an address of a workload whose
    SPIFFE ID is exactly the peer's (the peer holds that identity's SVID, so it runs that workload). An
    address nobody is known at, another identity's workload and a node's address are never believed.
    `peer` must already be the accepted workload identity (inbound maps aliases onto this domain)."""
    if view.is_node_address(ip):
        return Belief.NODE_ADDRESS, None
    known = view.workload_by_ip(ip)
    if known is None:
        return Belief.UNKNOWN, None
    if known.spiffe_id(view.trust_domain) != peer:
        return Belief.OTHER_IDENTITY, known
    return Belief.BELIEVED, known
