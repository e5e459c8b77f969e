"""tc attachments of the datapath programs: a clsact qdisc and direct-action bpf filters, one per hook
(pod veths carry pod_ingress at ingress and pod_egress at egress).

Our filter is identified by a fixed priority and handle, so attaching again (a restarted agent loading
a new program) is an atomic `replace`: packets never see a moment without a program. The kernel holds
the program while the filter exists, which is why pods keep their captured connections across an agent
restart. Every call works on the netns of the calling thread.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from agent.redirect.rtnl import Filter, NetlinkError, RtNetlink

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
    """A hook named `*_egress` sits at clsact egress, any other at ingress (one of ours per direction)."""
    return EGRESS_PARENT if hook.endswith("_egress") else INGRESS_PARENT


def _ensure_clsact(nl: RtNetlink, index: int) -> None:
    try:
        nl.clsact_add(index)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def attach(nl: RtNetlink, index: int, prog_fd: int, hook: str) -> None:
    """Attach (or atomically replace) our filter for `hook` on link `index` (its direction's only one)."""
    _ensure_clsact(nl, index)
    nl.bpf_filter_replace(
        index, parent_of(hook), FILTER_PRIO, ETH_P_ALL, FILTER_HANDLE, prog_fd, NAME_PREFIX + hook
    )


def _filters(nl: RtNetlink, index: int, parent: int) -> list[Filter]:
    try:
        return nl.filters(index, parent)
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):  # no clsact on the link, or link gone
            return []
        raise


def _our_hook(found: Filter) -> str | None:
    """The hook name of our bpf filter, None for other filters (and the chain headers)."""
    if found.kind != "bpf" or not found.bpf_name.startswith(NAME_PREFIX):
        return None
    return found.bpf_name[len(NAME_PREFIX) :]


def attachments(nl: RtNetlink) -> list[Attachment]:
    """Our filters on every link of this netns, both directions (including ones a previous agent left)."""
    found = []
    for link in nl.links():
        for parent in (INGRESS_PARENT, EGRESS_PARENT):
            for msg in _filters(nl, link.index, parent):
                hook = _our_hook(msg)
                if hook is not None:
                    found.append(Attachment(link.index, link.name, hook))
                    break
    return found


def detach(nl: RtNetlink, index: int, hook: str) -> None:
    """Remove our filter for `hook` from link `index`; the clsact qdisc goes too when nothing uses it."""
    try:
        nl.bpf_filter_delete(index, parent_of(hook), FILTER_PRIO, ETH_P_ALL, FILTER_HANDLE)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise
    if not _filters(nl, index, INGRESS_PARENT) and not _filters(nl, index, EGRESS_PARENT):
        try:
            nl.clsact_delete(index)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise
