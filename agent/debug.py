"""`ambit debug`: read a node agent's admin API (127.0.0.1:15000) and show it as tables, JSON or YAML.

With --node the query runs inside that lab node's network namespace (the admin API is loopback-only, so
it is only reachable from the node itself), the way `ambit lab exec` reaches a pod.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import urllib.parse
from collections.abc import Sequence
from typing import Any

import yaml

from agent.errors import UsageError
from agent.output import FORMATS, render

ADMIN_DEFAULT = "127.0.0.1:15000"
TIMEOUT_S = 5.0

# subcommand -> admin API path
VIEWS = {
    "workloads": "/workloads",
    "services": "/services",
    "policies": "/policies",
    "certs": "/certs",
    "connections": "/connections",
    "bpf": "/bpf",
    "config": "/config_dump",
}


def fetch(address: str, method: str, path: str) -> tuple[int, str]:
    """One HTTP request to the admin API; (status, body), or (0, reason) when it cannot be reached.

    Returns instead of raising so it can run in a forked child inside a netns (agent.netns.run_in).
    """
    host, _, port = address.rpartition(":")
    try:
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=TIMEOUT_S)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", errors="replace")
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return 0, str(exc) or type(exc).__name__


def _query(args: argparse.Namespace, method: str, path: str) -> Any:
    host, _, port = args.admin.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--admin {args.admin!r} is not HOST:PORT")
    where = args.admin
    if args.node:
        from agent import netns
        from agent.lab import control

        netns_name = control.netns_for(control.require(args.prefix), args.node)
        where = f"{args.admin} in {args.node} (netns {netns_name})"
        try:
            status, body = netns.run_in(netns_name, fetch, args.admin, method, path, timeout=TIMEOUT_S * 2)
        except (netns.NetnsError, OSError) as exc:
            raise UsageError(f"cannot enter {args.node}: {exc}".splitlines()[0]) from None
    else:
        status, body = fetch(args.admin, method, path)
    if status == 0:
        raise UsageError(f"cannot reach the agent admin API at {where}: {body} (is the agent running?)")
    try:
        data = json.loads(body)
    except ValueError:
        raise UsageError(f"agent at {where} answered {path} with non-JSON (HTTP {status})") from None
    if status != 200:
        message = data.get("error", body) if isinstance(data, dict) else body
        raise UsageError(f"agent at {where}: {message} (HTTP {status})")
    return data


def _rows_table(rows: Sequence[dict[str, Any]]) -> str:
    # Columns: every key of every row, in order of first appearance (rows need not share keys); nested
    # values are shown as compact JSON rather than Python reprs.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [{k: _compact(v) if isinstance(v, dict) else v for k, v in row.items()} for row in rows]
    return render(cells, "table", columns)


def _table(data: Any) -> str:
    """Rows as an aligned table; a mapping of row lists as titled sections; scalars as KEY/VALUE rows."""
    if isinstance(data, list):
        if all(isinstance(row, dict) for row in data):
            return _rows_table(data)
        return render([{"value": _compact(v)} for v in data], "table")
    if isinstance(data, dict):
        sections = {
            k: v for k, v in data.items() if isinstance(v, list) and all(isinstance(r, dict) for r in v)
        }
        scalars = {k: v for k, v in data.items() if k not in sections}
        parts = []
        if scalars:
            parts.append(render([{"key": k, "value": _compact(v)} for k, v in scalars.items()], "table"))
        parts += [f"{name.upper()}:\n{_rows_table(rows)}" for name, rows in sections.items()]
        return "\n\n".join(parts) if parts else "(none)"
    return _compact(data)


def _compact(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return "" if value is None else str(value)


def _show(data: Any, fmt: str) -> None:
    if fmt == "table":
        print(_table(data))
    elif fmt == "json":
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())


def _cmd_view(args: argparse.Namespace) -> int:
    path = VIEWS[args.view]
    data = _query(args, "GET", path)
    # A nested document has no table form: the config dump defaults to YAML.
    fmt = "yaml" if args.view == "config" and args.output == "table" else args.output
    _show(data, fmt)
    return 0


def _cmd_log_level(args: argparse.Namespace) -> int:
    if args.level:
        data = _query(args, "POST", "/logging?" + urllib.parse.urlencode({"level": args.level}))
    else:
        data = _query(args, "GET", "/logging")
    _show(data, args.output)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    # The plane's admin API, not the agent's: what every node ACKed or NACKed (mgmt/admin.py).
    status, body = fetch(args.plane, "GET", "/debug/status")
    if status == 0:
        raise UsageError(f"cannot reach the plane's admin API at {args.plane}: {body} (--plane HOST:PORT)")
    if status != 200:
        raise UsageError(f"plane at {args.plane} answered HTTP {status}: {body[:200]}")
    data = json.loads(body)
    _show(data["nodes"] if args.output == "table" else data, args.output)
    if args.output == "table":
        print(f"\nplane config version {data['version']} ({data['content_hash'][:12]})")
    return 0


def add_debug_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from agent.lab.plan import DEFAULT_PREFIX

    debug = sub.add_parser(
        "debug",
        help="inspect a node agent through its admin API",
        description=f"Query a node agent's admin API (default {ADMIN_DEFAULT}).",
    )
    debug.add_argument("--node", help="lab node to query (runs inside its network namespace; needs root)")
    debug.add_argument(
        "--prefix",
        default=os.environ.get("AMBIT_LAB_PREFIX", DEFAULT_PREFIX),
        help="lab prefix for --node (default %(default)s, env AMBIT_LAB_PREFIX)",
    )
    debug.add_argument(
        "--admin", default=ADMIN_DEFAULT, metavar="HOST:PORT", help="admin address (default %(default)s)"
    )
    views = debug.add_subparsers(dest="view", required=True, metavar="VIEW")
    helps = {
        "workloads": "workloads the node knows",
        "services": "services the node knows",
        "policies": "compiled authorization policies",
        "certs": "certificates held (never keys)",
        "connections": "live proxied connections",
        "bpf": "redirection datapath: enrolled pods, counters",
        "config": "the whole config dump (secrets redacted)",
    }
    for name, text in helps.items():
        view = views.add_parser(name, help=text)
        view.add_argument("-o", "--output", choices=FORMATS, default="table")
        view.set_defaults(func=_cmd_view)
    status = views.add_parser(
        "status", help="per node: the config version it ACKed or NACKed (the plane's view)"
    )
    status.add_argument("--plane", default="127.0.0.1:15014", metavar="HOST:PORT", help="plane admin address")
    status.add_argument("-o", "--output", choices=FORMATS, default="table")
    status.set_defaults(func=_cmd_status)
    level = views.add_parser("log-level", help="show or set the agent's log level")
    level.add_argument("level", nargs="?", help="new level: critical|error|warning|info|debug")
    level.add_argument("-o", "--output", choices=FORMATS, default="table")
    level.set_defaults(func=_cmd_log_level)
