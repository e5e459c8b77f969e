"""tc attachments of the datapath programs: a clsact qdisc and direct-action bpf filters, one per hook.

A hook named `*_egress` sits at clsact egress, every other one at ingress; a link carries at most one of
ours per direction (pod veths: pod_ingress and pod_egress).

Our filter is identified by a fixed priority and handle, so attaching again (a restarted agent loading
a new program) is an atomic `replace`: packets never see a moment without a program. The kernel holds
the program while the filter exists, which is why pods keep their captured connections across an agent
restart. Every call works on the netns of the calling thread.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

INGRESS_PARENT = 0xFFFFFFF2  # clsact ingress (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS))
EGRESS_PARENT = 0xFFFFFFF3
FILTER_PRIO = 0xA3B  # ours alone on the hook: other tools' filters keep their own priorities
FILTER_HANDLE = 1
NAME_PREFIX = "ambit_"
ETH_P_ALL = 0x0003


@dataclass(frozen=True)
class Attachment:
    index: int
    ifname: str
    hook: str  # the program's hook name (filter name without the prefix)


def parent_of(hook: str) -> int:
    return EGRESS_PARENT if hook.endswith("_egress") else INGRESS_PARENT


def _ensure_clsact(ipr: IPRoute, index: int) -> None:
    try:
        ipr.tc("add", "clsact", index)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def attach(ipr: IPRoute, index: int, prog_fd: int, hook: str) -> None:
    """Attach (or atomically replace) our filter for `hook` on link `index` (its direction's only one)."""
    _ensure_clsact(ipr, index)
    ipr.tc(
        "replace-filter",
        "bpf",
        index,
        FILTER_HANDLE,
        fd=prog_fd,
        name=NAME_PREFIX + hook,
        parent=parent_of(hook),
        prio=FILTER_PRIO,
        protocol=ETH_P_ALL,
        classid=1,
        direct_action=True,
    )


def _filters(ipr: IPRoute, index: int, parent: int) -> list[Any]:
    try:
        return list(ipr.get_filters(index=index, parent=parent))
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):  # no clsact on the link, or link gone
            return []
        raise


def _our_hook(msg: Any) -> str | None:
    """The hook name of our bpf filter message, None for other filters (and the chain headers)."""
    if msg.get_attr("TCA_KIND") != "bpf":
        return None
    options = msg.get_attr("TCA_OPTIONS")
    name = options.get_attr("TCA_BPF_NAME") if options is not None else None
    if not name or not name.startswith(NAME_PREFIX):
        return None
    return str(name[len(NAME_PREFIX) :])


def attachments(ipr: IPRoute) -> list[Attachment]:
    """Our filters on every link of this netns, both directions (including ones a previous agent left)."""
    found = []
    for link in ipr.get_links():
        index = link["index"]
        for parent in (INGRESS_PARENT, EGRESS_PARENT):
            for msg in _filters(ipr, index, parent):
                hook = _our_hook(msg)
                if hook is not None:
                    found.append(Attachment(index, str(link.get_attr("IFLA_IFNAME")), hook))
                    break
    return found


def detach(ipr: IPRoute, index: int, hook: str) -> None:
    """Remove our filter for `hook` from link `index`; the clsact qdisc goes too when nothing uses it."""
    try:
        ipr.tc(
            "del-filter",
            "bpf",
            index,
            FILTER_HANDLE,
            parent=parent_of(hook),
            prio=FILTER_PRIO,
            protocol=ETH_P_ALL,
        )
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise
    if not _filters(ipr, index, INGRESS_PARENT) and not _filters(ipr, index, EGRESS_PARENT):
        try:
            ipr.tc("del", "clsact", index)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise
