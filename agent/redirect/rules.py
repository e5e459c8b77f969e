"""Policy routing for steered packets: `fwmark ROUTE_MARK/ROUTE_MASK lookup ROUTE_TABLE` and, in that
table, `local 0.0.0.0/0 dev lo`.

A packet that tc assigned to a local socket still goes through the routing decision; without this rule
a packet for another host's address is forwarded (or dropped) instead of reaching the socket. The mask
keeps the agent's socket mark bits from ever selecting the table.
"""

from __future__ import annotations

import errno

from agent.redirect import marks
from agent.redirect.rtnl import NetlinkError, RtNetlink

RULE_PRIORITY = 100  # before `main` (32766) so steered packets never reach the forwarding routes
RTN_LOCAL = 2
RT_SCOPE_HOST = 254


def _lo_index(nl: RtNetlink) -> int:
    index = nl.link_index("lo")
    if index is None:
        raise NetlinkError(errno.ENODEV, "no loopback link in this netns")
    return index


def present(nl: RtNetlink) -> dict[str, bool]:
    rule = any(r.fwmark == marks.ROUTE_MARK and r.table == marks.ROUTE_TABLE for r in nl.rules())
    route = bool(nl.routes(marks.ROUTE_TABLE))
    return {"rule": rule, "route": route}


def ensure(nl: RtNetlink) -> None:
    """Install rule and route; idempotent (a restarted agent finds them in place)."""
    if not present(nl)["rule"]:
        nl.rule_add(marks.ROUTE_MARK, marks.ROUTE_MASK, marks.ROUTE_TABLE, RULE_PRIORITY)
    nl.route_replace(marks.ROUTE_TABLE, _lo_index(nl), RT_SCOPE_HOST, RTN_LOCAL)


def remove(nl: RtNetlink) -> None:
    for undo in (
        lambda: nl.rule_delete(marks.ROUTE_MARK, marks.ROUTE_MASK, marks.ROUTE_TABLE, RULE_PRIORITY),
        lambda: nl.route_delete(marks.ROUTE_TABLE, _lo_index(nl), RT_SCOPE_HOST, RTN_LOCAL),
    ):
        try:
            undo()
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise
