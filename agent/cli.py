"""The `ambit` command: one entry point for the lab, the node agent, the management plane and debugging.

Subcommands register themselves through small `add_*` functions so each area owns its own arguments;
heavy imports happen inside handlers to keep `ambit --help` fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from agent.errors import UsageError
from agent.output import FORMATS, render


def _progress(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def _lab_prefix(args: argparse.Namespace) -> str:
    return str(args.prefix)


def _cmd_lab_up(args: argparse.Namespace) -> int:
    from agent.lab import control
    from agent.lab.plan import plan_lab

    plan = plan_lab(args.nodes, args.pods, args.prefix, args.node_cidr, args.pod_cidr)
    control.up(plan, _progress)
    return 0


def _cmd_lab_down(args: argparse.Namespace) -> int:
    from agent.lab import control

    control.down(_lab_prefix(args), _progress)
    return 0


def _cmd_lab_status(args: argparse.Namespace) -> int:
    from agent.lab import control

    lab = control.require(_lab_prefix(args))
    print(
        render(
            control.status_rows(lab), args.output, ["kind", "name", "node", "ip", "cidr", "netns", "state"]
        )
    )
    return 0


def _cmd_lab_exec(args: argparse.Namespace) -> int:
    from agent import netns
    from agent.lab import control

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("nothing to run: ambit lab exec POD -- CMD [ARGS...]")
    lab = control.require(_lab_prefix(args))
    try:
        netns.exec_in(control.netns_for(lab, args.target), command)
    except FileNotFoundError:
        print(f"ambit: error: command not found: {command[0]}", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaces the process


def _cmd_lab_check(args: argparse.Namespace) -> int:
    from agent.lab import control
    from agent.lab.probe import check_all_pairs

    lab = control.require(_lab_prefix(args))
    results = check_all_pairs(lab.plan)
    rows = [
        {"from": r.src, "to": r.dst, "result": "ok" if r.ok else "FAIL", "detail": r.detail} for r in results
    ]
    print(render(rows, args.output))
    return 0 if all(r.ok for r in results) else 1


def _cmd_lab_mesh(args: argparse.Namespace) -> int:
    from agent.lab import control, mesh

    lab = control.require(_lab_prefix(args))
    mesh.up(lab.plan, _progress)
    return 0


def _cmd_lab_demo(args: argparse.Namespace) -> int:
    from agent.lab.demo import run_demo

    return run_demo(args.prefix, _progress)


def add_lab(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from agent.lab.plan import DEFAULT_NODE_CIDR, DEFAULT_POD_CIDR, DEFAULT_PREFIX

    lab = sub.add_parser("lab", help="local lab of network namespaces (nodes and pods on this machine)")
    lab.add_argument(
        "--prefix",
        default=os.environ.get("AMBIT_LAB_PREFIX", DEFAULT_PREFIX),
        help="name prefix of every lab namespace (default %(default)s, env AMBIT_LAB_PREFIX)",
    )
    verbs = lab.add_subparsers(dest="verb", required=True, metavar="VERB")
    up = verbs.add_parser("up", help="create nodes and pods (idempotent)")
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default %(default)s)")
    up.add_argument("--pods", type=int, default=2, help="pods per node (default %(default)s)")
    up.add_argument("--node-cidr", default=DEFAULT_NODE_CIDR, help="node addresses (default %(default)s)")
    up.add_argument(
        "--pod-cidr", default=DEFAULT_POD_CIDR, help="pod addresses, a /24 per node (default %(default)s)"
    )
    up.set_defaults(func=_cmd_lab_up)
    verbs.add_parser("down", help="remove everything the lab made").set_defaults(func=_cmd_lab_down)
    status = verbs.add_parser("status", help="nodes, pods, addresses and lab processes")
    status.add_argument("-o", "--output", choices=FORMATS, default="table")
    status.set_defaults(func=_cmd_lab_status)
    ex = verbs.add_parser("exec", help="run a command in a pod's or node's network namespace")
    ex.add_argument("target", metavar="POD", help="pod or node name, e.g. pod-1-1 or node-2")
    ex.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD")
    ex.set_defaults(func=_cmd_lab_exec)
    check = verbs.add_parser("check", help="TCP echo from every pod to every other pod")
    check.add_argument("-o", "--output", choices=FORMATS, default="table")
    check.set_defaults(func=_cmd_lab_check)
    verbs.add_parser(
        "mesh", help="start the management plane and an agent on every node of the lab"
    ).set_defaults(func=_cmd_lab_mesh)
    verbs.add_parser("demo", help="the `make lab` walk-through: up, traffic, down").set_defaults(
        func=_cmd_lab_demo
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ambit", description="ambit: zero-trust mesh data plane")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_lab(sub)
    # Each area owns its own subcommand and arguments; imports stay light so `ambit --help` is fast.
    from agent.daemon import add_agent_command
    from agent.debug import add_debug_command
    from gateway.cli import add_gateway_command
    from mgmt.cli import add_mgmt_command

    add_agent_command(sub)
    add_mgmt_command(sub)
    add_debug_command(sub)
    add_gateway_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"ambit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
