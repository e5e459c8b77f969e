"""`ambit debug`: read a node agent's admin API (127.0.0.1:15000) and show it as tables, JSON or YAML.

With --node the query runs inside that lab node's network namespace (the admin API is loopback-only, so
it is only reachable from the node itself), the way `ambit lab exec` reaches a pod.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import shlex
import subprocess
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from agent.cliargs import PREFIX_OPTION, Shared, add_command, share
from agent.errors import UsageError
from agent.output import FORMATS, render

ADMIN_DEFAULT = "127.0.0.1:15000"
TIMEOUT_S = 5.0

# subcommand -> admin API path
VIEWS = {
    "workloads": "/workloads",
    "services": "/services",
    "reachable": "/reachable",
    "policies": "/policies",
    "certs": "/certs",
    "trust-bundle": "/trust_bundle",
    "connections": "/connections",
    "bpf": "/bpf",
    "threads": "/threads",
    "memory": "/memory",
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


MAX_ANSWER = 64 * 1024 * 1024  # a config dump of a large mesh, with room to spare


def fetch_through(command: str, method: str, path: str) -> tuple[int, str]:
    """One request over a command whose stdin/stdout reach the admin port (ssh -W, kubectl exec ... nc):
    the admin API stays on loopback and the operator's own transport carries the query, as a port-forward
    would. (status, body) or (0, reason), as fetch()."""
    argv = shlex.split(command)
    if not argv:
        return 0, "empty --tunnel command"
    request = f"{method} {path} HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    try:
        done = subprocess.run(argv, input=request, capture_output=True, timeout=TIMEOUT_S * 2, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 0, f"{argv[0]}: {exc}"
    if not done.stdout:
        # The command's last word on it (ssh's, nc's) makes the one error line.
        said = [line for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
        return 0, said[-1].strip() if said else f"{argv[0]} exited {done.returncode}"
    if len(done.stdout) > MAX_ANSWER:
        return 0, f"answer larger than {MAX_ANSWER} bytes"
    response = http.client.HTTPResponse(_Answer(done.stdout))  # type: ignore[arg-type]
    try:
        response.begin()
        return response.status, response.read().decode("utf-8", errors="replace")
    except (http.client.HTTPException, ValueError) as exc:
        return 0, f"not an HTTP answer through {argv[0]}: {exc}"


class _Answer:
    """The bytes a tunnel command printed, as the socket http.client reads a response from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BytesIO:
        return io.BytesIO(self._data)


def _query(args: argparse.Namespace, method: str, path: str) -> Any:
    host, _, port = args.admin.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--admin {args.admin!r} is not HOST:PORT")
    where = args.admin
    if args.tunnel:
        where = f"the other end of `{args.tunnel}`"
        status, body = fetch_through(args.tunnel, method, path)
    elif args.node:
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
        import yaml  # only for -o yaml (the node agent builds this parser too)

        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())


def _cmd_view(args: argparse.Namespace) -> int:
    path = VIEWS[args.view]
    data = filter_view(_query(args, "GET", path), _filters(args))
    if args.view == "certs" and args.output == "table":
        print(_rows_table(cert_lines(data)) if data else "(none)")
        return 0
    # A nested document has no table form: the config dump defaults to YAML.
    fmt = "yaml" if args.view in ("config", "memory") and args.output == "table" else args.output
    _show(data, fmt)
    return 0


def cert_lines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table line per certificate (leaf, intermediates, root), as istioctl ztunnel-config shows them."""
    out = []
    for row in rows:
        for cert in row.get("chain") or [{"type": "leaf"}]:
            leaf = cert["type"] == "leaf"
            out.append(
                {
                    "identity": row.get("identity", "") if leaf else "",
                    "type": cert["type"],
                    "state": row.get("state", "") if leaf else cert.get("state", "ok"),
                    "serial": cert.get("serial", row.get("serial", "") if leaf else ""),
                    "not_after": cert.get("not_after", row.get("not_after", "") if leaf else ""),
                    "subject": cert.get("subject", ""),
                }
            )
    return out


def _cmd_all(args: argparse.Namespace) -> int:
    """Every view in one answer (istioctl's `ztunnel-config all`), filtered alike. A view whose component
    does not run on that agent says so in its place; an agent that cannot be reached is one error."""
    filters = _filters(args)
    data: dict[str, Any] = {}
    failures: list[UsageError] = []
    for view, path in VIEWS.items():
        if view in ("config", "memory"):  # not the mesh's state: the process's
            continue
        try:
            data[view] = filter_view(_query(args, "GET", path), filters)
        except UsageError as exc:
            failures.append(exc)
            data[view] = {"error": str(exc)}
    if len(failures) == len(data):
        raise failures[0]
    if args.output == "table":
        print("\n\n".join(f"== {view.upper()} ==\n{_table(rows)}" for view, rows in data.items()))
    else:
        _show(data, args.output)
    return 0


def _filters(args: argparse.Namespace) -> dict[str, str]:
    return {
        k: v
        for k, v in (("namespace", args.namespace), ("workload", args.workload), ("address", args.address))
        if v
    }


def filter_view(data: Any, filters: dict[str, str]) -> Any:
    """Keep the rows of a view that match every filter; a mapping of row lists is filtered list by list.

    Rows differ by view, so a filter matches values rather than named columns: a namespace is a value
    "NS", a "NS/name" uid or a SPIFFE ".../ns/NS/..." ID; a workload a "name" or "*/name"; an address an
    IP alone, in a list ("a,b") or with a port ("ip:port", "[v6]:port")."""
    if not filters:
        return data
    if isinstance(data, list):
        return [row for row in data if not isinstance(row, dict) or _matches(row, filters)]
    if isinstance(data, dict):
        return {k: filter_view(v, filters) if isinstance(v, list) else v for k, v in data.items()}
    return data


def _matches(row: dict[str, Any], filters: dict[str, str]) -> bool:
    values = list(_strings(row))
    tests = {
        "namespace": lambda v, ns: v == ns or v.startswith(ns + "/") or f"/ns/{ns}/" in v,
        "workload": lambda v, w: v == w or v.endswith("/" + w),
        "address": lambda v, a: a in _addresses(v),
    }
    return all(any(tests[name](v, want) for v in values) for name, want in filters.items())


def _strings(value: Any) -> Any:
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def _addresses(value: str) -> set[str]:
    out = set()
    for part in value.replace(" ", ",").split(","):
        part = part.strip()
        if part.startswith("["):
            out.add(part[1:].partition("]")[0])
        elif part.count(":") == 1:
            out.add(part.partition(":")[0])
        out.add(part)
    return out


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


HELPS = {
    "workloads": "workloads the node holds: its own, and the peers it looked up",
    "services": "services the node knows",
    "reachable": "every workload of the mesh the node could reach (asked of the plane; HELD: known locally)",
    "policies": "compiled authorization policies",
    "certs": "certificates held (never keys): each identity's chain, leaf to trust-bundle root",
    "trust-bundle": "the trust anchors the node verifies peers against",
    "connections": "live proxied connections",
    "bpf": "redirection datapath: enrolled pods, counters",
    "threads": "every thread of the agent process (Python and native), by name",
    "memory": "the agent process's memory: resident (anonymous, file-backed), largest mappings, modules",
    "config": "the whole config dump (secrets redacted)",
}


# Accepted before or after the view: `debug --node n -o json workloads` == `debug workloads --node n -o json`.
DEBUG_OPTIONS = [
    Shared(("--node",), "node", "", "lab node to query (runs inside its network namespace; needs root)"),
    PREFIX_OPTION,
    Shared(
        ("--admin",),
        "admin",
        ADMIN_DEFAULT,
        f"admin address (default {ADMIN_DEFAULT})",
        {"metavar": "HOST:PORT"},
    ),
    Shared(("-o", "--output"), "output", "table", "output format (default table)", {"choices": FORMATS}),
    Shared(
        ("--tunnel",),
        "tunnel",
        "",
        "reach a remote agent's loopback admin API through this command's stdin/stdout, e.g. "
        "'ssh -W 127.0.0.1:15000 node1'",
        {"metavar": "CMD"},
    ),
    Shared(("-n", "--namespace"), "namespace", "", "only rows of this namespace"),
    Shared(("--workload",), "workload", "", "only rows of this workload (name or NS/NAME)"),
    Shared(("--address",), "address", "", "only rows with this IP"),
]


def add_debug_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`ambit debug [OPTIONS] VIEW [OPTIONS]`; another area adds a view with add_view(views, ...)."""
    debug = add_command(
        sub,
        "debug",
        "inspect a node agent through its admin API",
        description=f"Query a node agent's admin API (default {ADMIN_DEFAULT}, loopback only). Options may "
        "come before or after the view.",
        example_lines=(
            "ambit debug workloads                              # the agent on this host",
            "ambit debug --node node-1 workloads -n demo        # a lab node, namespace demo only",
            "ambit debug connections --node node-2 -o json",
            "ambit debug all --node node-1 --address 10.244.2.2",
            "ambit debug --node node-1 log-level debug",
            "ambit debug workloads --tunnel 'ssh -W 127.0.0.1:15000 node1'   # a remote node, over ssh",
        ),
    )
    views = debug.add_subparsers(dest="view", required=True, metavar="VIEW")
    for name, text in HELPS.items():
        add_view(views, name, text, _cmd_view)
    add_view(views, "all", "every view above but config and memory, in one answer", _cmd_all)
    status = add_view(
        views, "status", "per node: the config version it ACKed or NACKed (the plane's view)", _cmd_status
    )
    status.add_argument("--plane", default="127.0.0.1:15014", metavar="HOST:PORT", help="plane admin address")
    level = add_view(views, "log-level", "show or set the agent's log level", _cmd_log_level)
    level.add_argument("level", nargs="?", help="new level: critical|error|warning|info|debug")
    share([debug], DEBUG_OPTIONS)


def add_view(
    views: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    text: str,
    func: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    view: argparse.ArgumentParser = views.add_parser(name, help=text, description=text)
    view.set_defaults(func=func)
    share([view], DEBUG_OPTIONS)
    return view
