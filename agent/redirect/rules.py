"""Policy routing for steered packets: `fwmark ROUTE_MARK/ROUTE_MASK lookup ROUTE_TABLE` and, in that
table, `local 0.0.0.0/0 dev lo`.

A packet that tc assigned to a local socket still goes through the routing decision; without this rule
a packet for another host's address is forwarded (or dropped) instead of reaching the socket. The mask
keeps the agent's socket mark bits from ever selecting the table.
"""

from __future__ import annotations

import errno
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.redirect import marks

RULE_PRIORITY = 100  # before `main` (32766) so steered packets never reach the forwarding routes


def _lo_index(ipr: IPRoute) -> int:
    return int(ipr.link_lookup(ifname="lo")[0])


def _rule_args() -> dict[str, int]:
    return {
        "family": socket.AF_INET,
        "fwmark": marks.ROUTE_MARK,
        "fwmask": marks.ROUTE_MASK,
        "table": marks.ROUTE_TABLE,
        "priority": RULE_PRIORITY,
    }


def _route_args(ipr: IPRoute) -> dict[str, object]:
    return {
        "dst": "0.0.0.0/0",
        "type": "local",
        "scope": "host",
        "oif": _lo_index(ipr),
        "table": marks.ROUTE_TABLE,
    }


def present(ipr: IPRoute) -> dict[str, bool]:
    rule = any(
        r.get_attr("FRA_FWMARK") == marks.ROUTE_MARK and r.get_attr("FRA_TABLE") == marks.ROUTE_TABLE
        for r in ipr.get_rules(family=socket.AF_INET)
    )
    route = bool(list(ipr.get_routes(family=socket.AF_INET, table=marks.ROUTE_TABLE)))
    return {"rule": rule, "route": route}


def ensure(ipr: IPRoute) -> None:
    """Install rule and route; idempotent (a restarted agent finds them in place)."""
    if not present(ipr)["rule"]:
        ipr.rule("add", **_rule_args())
    ipr.route("replace", **_route_args(ipr))


def remove(ipr: IPRoute) -> None:
    for undo in (lambda: ipr.rule("del", **_rule_args()), lambda: ipr.route("del", **_route_args(ipr))):
        try:
            undo()
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise
