"""The source pod a peer node claims for an HBONE stream: the CONNECT's `forwarded` header (RFC 7239).

Strict on purpose: the only accepted form is one element with one `for=` pair naming an IP address
(`for=10.244.1.2`, `for="10.244.1.2"`, `for="[fd00::2]"`), exactly what our engine sends. Lists, other
parameters, ports, obfuscated names (`_x`, `unknown`), zones, loopback/unspecified/multicast addresses
and anything malformed are refused; the caller then treats the header as absent. Whether a well-formed
claim is believed is `believe` (docs/proxy.md, "Source address").
"""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import Protocol

from api.resources.workload import Workload
from api.spiffe import SpiffeId

MAX_LENGTH = 255  # the engine never hands over more (longer headers arrive as an invalid marker)

# RFC 7239: forwarded-pair = token "=" value; value = token / quoted-string. No whitespace around "=".
_PAIR = re.compile(r'(?i:for)=(?:"([^"\\]*)"|([^\s",;=]+))')


class ForwardedError(ValueError):
    """The header is present but is not one valid `for=<ip>` claim."""


def parse_forwarded_for(value: str) -> str | None:
    """The IP address claimed by `value` (normalized), None when the header is absent ("").

    Raises ForwardedError for anything but a single `for=<ip>` pair.
    """
    if not value:
        return None
    if len(value) > MAX_LENGTH or not value.isascii():
        raise ForwardedError("forwarded header too long or not ASCII")
    m = _PAIR.fullmatch(value.strip(" \t"))
    if m is None:
        raise ForwardedError(f"forwarded header is not a single for= pair: {value[:64]!r}")
    quoted, bare = m.group(1), m.group(2)
    node = quoted if quoted is not None else bare
    if node.startswith("["):  # IPv6 must be bracketed and therefore quoted (RFC 7239 section 6)
        if quoted is None or not node.endswith("]"):
            raise ForwardedError(f"forwarded IPv6 node not quoted and bracketed: {node[:64]!r}")
        text, version = node[1:-1], 6
    else:
        text, version = node, 4
    if "%" in text:
        raise ForwardedError("forwarded address has a zone")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ForwardedError(f"forwarded node is not an IP address: {node[:64]!r}") from None
    if addr.version != version:
        raise ForwardedError(f"forwarded node {node[:64]!r}: IPv6 must be bracketed, IPv4 must not")
    if addr.is_unspecified or addr.is_loopback or addr.is_multicast:
        raise ForwardedError(f"forwarded address {addr} cannot be a pod")
    return addr.compressed


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
