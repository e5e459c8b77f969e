"""The rtnetlink requests the datapath makes (links, addresses, routes, rules, clsact qdiscs, bpf filters),
over one NETLINK_ROUTE socket, with the message layouts of linux/rtnetlink.h, fib_rules.h, pkt_sched.h
and pkt_cls.h.

Small on purpose: pyroute2 covers all of netlink but costs a node agent ~23 MB and ~300 modules to
import, more than the rest of the datapath; the agent needs these few messages. The socket belongs to
the network namespace of the thread that opens it.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RTM_GETLINK, RTM_GETADDR = 18, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
RTM_NEWQDISC, RTM_DELQDISC = 36, 37
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46

IFLA_IFNAME = 3
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 6, 10, 15, 16
FR_ACT_TO_TBL = 1
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_CLASSID, TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS = 3, 6, 7, 8
TCA_BPF_FLAG_ACT_DIRECT = 1
TC_H_CLSACT = 0xFFFFFFF1
CLSACT_HANDLE = 0xFFFF0000
RTPROT_BOOT = 3

_NLMSG = struct.Struct("=IHHII")
_RTATTR = struct.Struct("=HH")
_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")  # also fib_rule_hdr: same size, fields read by position
_TCMSG = struct.Struct("=BxxxiIII")
_U32 = struct.Struct("=I")
_ATTR_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
RECV_BUFFER = 1 << 16


class NetlinkError(OSError):
    """The kernel's refusal of a request; `code` is the errno (as pyroute2 names it)."""

    @property
    def code(self) -> int:
        return int(self.errno or 0)


@dataclass(frozen=True)
class Link:
    index: int
    name: str


@dataclass(frozen=True)
class Address:
    index: int
    prefixlen: int


@dataclass(frozen=True)
class Route:
    type: int
    dst_len: int
    scope: int
    table: int
    oif: int | None
    gateway: bytes | None


@dataclass(frozen=True)
class Rule:
    fwmark: int | None
    table: int


@dataclass(frozen=True)
class Filter:
    kind: str
    bpf_name: str


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, value: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(value), kind) + value
    return raw + b"\0" * (_align(len(raw)) - len(raw))


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def parse_attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            break
        out.setdefault(kind & _ATTR_TYPE_MASK, data[offset + _RTATTR.size : offset + length])
        offset += _align(length)
    return out


def _u32(attrs: dict[int, bytes], kind: int) -> int | None:
    value = attrs.get(kind)
    return _U32.unpack(value[:4])[0] if value is not None and len(value) >= 4 else None


def _text(value: bytes | None) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace") if value else ""


class RtNetlink:
    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def _request(self, msg_type: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """Send one request; the replies (type, payload) until its ack or the end of its dump."""
        self._seq += 1
        seq = self._seq
        self._sock.send(_NLMSG.pack(_NLMSG.size + len(body), msg_type, NLM_F_REQUEST | flags, seq, 0) + body)
        replies: list[tuple[int, bytes]] = []
        while True:
            data = self._sock.recv(RECV_BUFFER)
            for kind, payload, reply_seq in _messages(data):
                if reply_seq != seq:
                    continue  # a late answer to an earlier, abandoned request
                if kind == NLMSG_DONE:
                    return replies
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return replies  # the ack
                replies.append((kind, payload))
                if not flags & (NLM_F_DUMP | NLM_F_ACK):
                    return replies

    def _dump(self, msg_type: int, body: bytes) -> list[bytes]:
        return [payload for _, payload in self._request(msg_type, NLM_F_DUMP, body)]

    # -- links and addresses -------------------------------------------------------------------------

    def links(self) -> list[Link]:
        return [_link(p) for p in self._dump(RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0))]

    def link(self, index: int) -> Link | None:
        try:
            replies = self._request(RTM_GETLINK, 0, _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0))
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.EINVAL):
                return None
            raise
        return _link(replies[0][1]) if replies else None

    def link_index(self, name: str) -> int | None:
        return next((link.index for link in self.links() if link.name == name), None)

    def ipv4_addresses(self) -> list[Address]:
        out = []
        for payload in self._dump(RTM_GETADDR, _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0)):
            _, prefixlen, _, _, index = _IFADDR.unpack_from(payload)
            out.append(Address(index, prefixlen))
        return out

    # -- routes and rules ----------------------------------------------------------------------------

    def routes(self, table: int) -> list[Route]:
        """The IPv4 routes of `table`."""
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        return [r for r in (_route(p) for p in self._dump(RTM_GETROUTE, body)) if r.table == table]

    def route_get(self, dst: str) -> Route:
        """The route the kernel would take to `dst` (RTM_GETROUTE for one address)."""
        body = _RTMSG.pack(socket.AF_INET, 32, 0, 0, 0, 0, 0, 0, 0) + attr(RTA_DST, socket.inet_aton(dst))
        replies = self._request(RTM_GETROUTE, 0, body)
        if not replies:
            raise NetlinkError(errno.ENETUNREACH, f"no route to {dst}")
        return _route(replies[0][1])

    def _local_default(self, msg_type: int, flags: int, table: int, oif: int, scope: int, rtype: int) -> None:
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, table, RTPROT_BOOT, scope, rtype, 0)
        self._request(msg_type, NLM_F_ACK | flags, body + attr_u32(RTA_TABLE, table) + attr_u32(RTA_OIF, oif))

    def route_replace(self, table: int, oif: int, scope: int, rtype: int) -> None:
        """`0.0.0.0/0` of `rtype` via link `oif` in `table`, replacing what is there."""
        self._local_default(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, table, oif, scope, rtype)

    def route_delete(self, table: int, oif: int, scope: int, rtype: int) -> None:
        self._local_default(RTM_DELROUTE, 0, table, oif, scope, rtype)

    def rules(self) -> list[Rule]:
        out = []
        for payload in self._dump(RTM_GETRULE, _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)):
            attrs = parse_attrs(payload[_RTMSG.size :])
            out.append(Rule(_u32(attrs, FRA_FWMARK), _u32(attrs, FRA_TABLE) or payload[4]))
        return out

    def _fwmark_rule(
        self, msg_type: int, flags: int, fwmark: int, fwmask: int, table: int, priority: int
    ) -> None:
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, table, 0, 0, FR_ACT_TO_TBL, 0) + b"".join(
            attr_u32(kind, value)
            for kind, value in (
                (FRA_PRIORITY, priority),
                (FRA_FWMARK, fwmark),
                (FRA_FWMASK, fwmask),
                (FRA_TABLE, table),
            )
        )
        self._request(msg_type, NLM_F_ACK | flags, body)

    def rule_add(self, fwmark: int, fwmask: int, table: int, priority: int) -> None:
        self._fwmark_rule(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, fwmark, fwmask, table, priority)

    def rule_delete(self, fwmark: int, fwmask: int, table: int, priority: int) -> None:
        self._fwmark_rule(RTM_DELRULE, 0, fwmark, fwmask, table, priority)

    # -- tc ------------------------------------------------------------------------------------------

    def clsact_add(self, index: int) -> None:
        body = _TCMSG.pack(socket.AF_UNSPEC, index, CLSACT_HANDLE, TC_H_CLSACT, 0) + attr_str(
            TCA_KIND, "clsact"
        )
        self._request(RTM_NEWQDISC, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, body)

    def clsact_delete(self, index: int) -> None:
        body = _TCMSG.pack(socket.AF_UNSPEC, index, CLSACT_HANDLE, TC_H_CLSACT, 0) + attr_str(
            TCA_KIND, "clsact"
        )
        self._request(RTM_DELQDISC, NLM_F_ACK, body)

    def bpf_filter_replace(
        self, index: int, parent: int, prio: int, protocol: int, handle: int, prog_fd: int, name: str
    ) -> None:
        """A direct-action bpf filter (what `tc filter replace ... bpf da fd N` makes): atomic replace."""
        options = (
            attr_u32(TCA_BPF_FD, prog_fd)
            + attr_str(TCA_BPF_NAME, name)
            + attr_u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT)
            + attr_u32(TCA_BPF_CLASSID, 1)
        )
        body = _TCMSG.pack(socket.AF_UNSPEC, index, handle, parent, _tc_info(prio, protocol))
        body += attr_str(TCA_KIND, "bpf") + attr(TCA_OPTIONS, options)
        self._request(RTM_NEWTFILTER, NLM_F_ACK | NLM_F_CREATE, body)

    def bpf_filter_delete(self, index: int, parent: int, prio: int, protocol: int, handle: int) -> None:
        body = _TCMSG.pack(socket.AF_UNSPEC, index, handle, parent, _tc_info(prio, protocol))
        self._request(RTM_DELTFILTER, NLM_F_ACK, body + attr_str(TCA_KIND, "bpf"))

    def filters(self, index: int, parent: int) -> list[Filter]:
        out = []
        for payload in self._dump(RTM_GETTFILTER, _TCMSG.pack(socket.AF_UNSPEC, index, 0, parent, 0)):
            attrs = parse_attrs(payload[_TCMSG.size :])
            options = parse_attrs(attrs.get(TCA_OPTIONS, b""))
            out.append(Filter(_text(attrs.get(TCA_KIND)), _text(options.get(TCA_BPF_NAME))))
        return out


def _tc_info(prio: int, protocol: int) -> int:
    """tcm_info of a filter: TC_H_MAKE(prio << 16, protocol), the protocol in network byte order."""
    return (prio << 16) | socket.htons(protocol)


def _messages(data: bytes) -> Iterator[tuple[int, bytes, int]]:
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _, seq, _ = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            return
        yield kind, data[offset + _NLMSG.size : offset + length], seq
        offset += _align(length)


def _link(payload: bytes) -> Link:
    _, _, index, _, _ = _IFINFO.unpack_from(payload)
    return Link(index, _text(parse_attrs(payload[_IFINFO.size :]).get(IFLA_IFNAME)))


def _route(payload: bytes) -> Route:
    _, dst_len, _, _, table, _, scope, rtype, _ = _RTMSG.unpack_from(payload)
    attrs = parse_attrs(payload[_RTMSG.size :])
    return Route(
        rtype, dst_len, scope, _u32(attrs, RTA_TABLE) or table, _u32(attrs, RTA_OIF), attrs.get(RTA_GATEWAY)
    )
