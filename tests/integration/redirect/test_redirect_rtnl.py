"""The datapath's own rtnetlink client: attribute encoding both ways, malformed input never crashes it,
and the kernel's refusals come back as NetlinkError with their errno (the first tests need no root)."""

from __future__ import annotations

import errno

import pytest

from agent.redirect import rtnl


def test_attributes_round_trip_and_are_padded() -> None:
    raw = rtnl.attr_str(rtnl.TCA_KIND, "bpf") + rtnl.attr_u32(rtnl.TCA_BPF_FD, 7)
    assert len(raw) % 4 == 0
    attrs = rtnl.parse_attrs(raw)
    assert attrs[rtnl.TCA_KIND] == b"bpf\0"
    assert rtnl._u32(attrs, rtnl.TCA_BPF_FD) == 7
    nested = rtnl.attr(rtnl.TCA_OPTIONS | 0x8000, rtnl.attr_str(rtnl.TCA_BPF_NAME, "ambit_pod_ingress"))
    options = rtnl.parse_attrs(rtnl.parse_attrs(nested)[rtnl.TCA_OPTIONS])  # NLA_F_NESTED masked off
    assert rtnl._text(options[rtnl.TCA_BPF_NAME]) == "ambit_pod_ingress"


def test_truncated_or_garbage_messages_parse_to_what_is_whole() -> None:
    raw = rtnl.attr_u32(rtnl.RTA_OIF, 3)
    assert rtnl.parse_attrs(raw[:-2]) == {rtnl.RTA_OIF: b"\3\0"}  # length says 8, 6 bytes left
    assert rtnl.parse_attrs(b"\x01\x00\x01\x00garbage") == {}  # a length below the header stops parsing
    assert rtnl._u32({rtnl.RTA_OIF: b"\1"}, rtnl.RTA_OIF) is None
    assert list(rtnl._messages(b"\x05\x00\x00\x00" + b"\0" * 12)) == []


def _refusals() -> tuple[int, int, list[str]]:
    nl = rtnl.RtNetlink()
    try:
        links = [link.name for link in nl.links()]
        try:
            nl.route_get("10.255.0.1")  # an empty netns has no route anywhere
            unreachable = 0
        except rtnl.NetlinkError as exc:
            unreachable = exc.code
        try:
            nl.clsact_delete(12345)  # no such link
            missing = 0
        except rtnl.NetlinkError as exc:
            missing = exc.code
    finally:
        nl.close()
    return unreachable, missing, links


@pytest.mark.root
def test_refusals_carry_the_kernels_errno(lab_prefix: str) -> None:
    from pyroute2 import netns

    from agent import netns as nsx

    name = f"{lab_prefix}bare"
    netns.create(name)
    try:
        unreachable, missing, links = nsx.run_in(name, _refusals)
    finally:
        netns.remove(name)
    assert unreachable == errno.ENETUNREACH
    assert missing == errno.ENODEV
    assert links == ["lo"]
