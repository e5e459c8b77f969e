# PYTHON_ARGCOMPLETE_OK  (argcomplete looks for this marker: `eval "$(ambit completion bash)"`)
"""The `ambit` command: one entry point for the lab, the node agent, the management plane and debugging.

Subcommands register themselves through small `add_*` functions so each area owns its own arguments;
heavy imports happen inside handlers to keep `ambit --help` (and tab completion) fast. Options shared by
a command tree (`--prefix`, `-o`, `--node`, ...) are accepted at any level of it (agent.cliargs).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from agent.cliargs import PREFIX_OPTION, HelpFormatter, Shared, add_command, apply_defaults, examples, share
from agent.errors import UsageError
from agent.output import FORMATS, render


def _progress(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ambit")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def _cmd_lab_up(args: argparse.Namespace) -> int:
    from agent.lab import control
    from agent.lab.plan import plan_lab

    plan = plan_lab(args.nodes, args.pods, args.prefix, args.node_cidr, args.pod_cidr)
    control.up(plan, _progress)
    if args.kube:
        from agent.lab import kubelab

        kubelab.up(plan, _progress)
    return 0


def _cmd_lab_down(args: argparse.Namespace) -> int:
    from agent.lab import control

    control.down(args.prefix, _progress)
    return 0


def _cmd_lab_status(args: argparse.Namespace) -> int:
    from agent.lab import control, mesh

    lab = control.require(args.prefix)
    rows = control.status_rows(lab) + mesh.status_rows(args.prefix)
    print(render(rows, args.output, ["kind", "name", "node", "ip", "cidr", "netns", "state"]))
    return 0


def _cmd_lab_exec(args: argparse.Namespace) -> int:
    from agent import netns
    from agent.lab import control

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("nothing to run: ambit lab exec POD -- CMD [ARGS...]")
    lab = control.require(args.prefix)
    try:
        netns.exec_in(control.netns_for(lab, args.target), command)
    except FileNotFoundError:
        print(f"ambit: error: command not found: {command[0]}", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaces the process


def _cmd_lab_check(args: argparse.Namespace) -> int:
    from agent.lab import control
    from agent.lab.probe import check_all_pairs

    lab = control.require(args.prefix)
    results = check_all_pairs(lab.plan)
    rows = [
        {"from": r.src, "to": r.dst, "result": "ok" if r.ok else "FAIL", "detail": r.detail} for r in results
    ]
    print(render(rows, args.output))
    return 0 if all(r.ok for r in results) else 1


def _cmd_lab_mesh(args: argparse.Namespace) -> int:
    from agent.lab import control, mesh

    lab = control.require(args.prefix)
    mesh.up(lab.plan, _progress, app=not args.no_app)
    return 0


def _cmd_lab_config_check(args: argparse.Namespace) -> int:
    from agent.lab import mesh

    directory = args.dir or str(mesh.run_dir(args.prefix) / "config")
    rows = mesh.config_problems(directory)
    if args.output != "table" or rows:
        print(render(rows, args.output, ["where", "reason"]))
    if not rows:
        print(f"config in {directory}: ok", file=sys.stderr)
    return 1 if rows else 0


def _cmd_lab_demo(args: argparse.Namespace) -> int:
    from agent.lab.demo import run_demo

    return run_demo(args.prefix, _progress, kube=args.kube)


_KUBE_HELP = "workloads as Pods in a real Kubernetes API server (the plane watches it; docs/kube.md)"


def add_lab(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from agent.lab.plan import DEFAULT_NODE_CIDR, DEFAULT_POD_CIDR

    lab = add_command(
        sub,
        "lab",
        "local lab of network namespaces (nodes and pods on this machine)",
        (
            "ambit lab up --nodes 2 --pods 2          # idempotent",
            "ambit lab mesh                           # plane + one agent per node, HTTP on pod-2-1:8080",
            "ambit lab exec pod-1-1 -- curl -s http://10.244.2.2:8080/",
            "ambit lab status -o json | jq .",
            "ambit lab config check                   # validate the mesh config the plane watches",
            "ambit lab down --prefix t1-",
        ),
    )
    verbs = lab.add_subparsers(dest="verb", required=True, metavar="VERB")
    up = verbs.add_parser("up", help="create nodes and pods (idempotent)")
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default %(default)s)")
    up.add_argument("--pods", type=int, default=2, help="pods per node (default %(default)s)")
    up.add_argument("--node-cidr", default=DEFAULT_NODE_CIDR, help="node addresses (default %(default)s)")
    up.add_argument(
        "--pod-cidr", default=DEFAULT_POD_CIDR, help="pod addresses, a /24 per node (default %(default)s)"
    )
    up.add_argument("--kube", action="store_true", help=_KUBE_HELP)
    up.set_defaults(func=_cmd_lab_up)
    down = verbs.add_parser("down", help="remove everything the lab made")
    down.set_defaults(func=_cmd_lab_down)
    status = verbs.add_parser("status", help="nodes, pods, addresses and lab processes")
    status.set_defaults(func=_cmd_lab_status)
    ex = verbs.add_parser("exec", help="run a command in a pod's or node's network namespace")
    ex.add_argument("target", metavar="POD", help="pod or node name, e.g. pod-1-1 or node-2")
    ex.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD")
    ex.set_defaults(func=_cmd_lab_exec)
    check = verbs.add_parser("check", help="TCP echo from every pod to every other pod")
    check.set_defaults(func=_cmd_lab_check)
    mesh = verbs.add_parser(
        "mesh",
        help="start the management plane and an agent on every node of the lab (idempotent)",
        description="Start the plane and the agents (those already running are kept), and an HTTP server "
        "on pod-2-1:8080 to try the mesh with.",
    )
    mesh.add_argument("--no-app", action="store_true", help="do not start the HTTP server on pod-2-1")
    mesh.set_defaults(func=_cmd_lab_mesh)
    config = verbs.add_parser("config", help="the lab mesh's config (YAML the plane watches)")
    config_verbs = config.add_subparsers(dest="config_verb", required=True, metavar="VERB")
    config_check = config_verbs.add_parser("check", help="validate the config as the plane would")
    config_check.add_argument("--dir", default="", help="config directory (default: the lab mesh's)")
    config_check.set_defaults(func=_cmd_lab_config_check)
    demo = verbs.add_parser("demo", help="the `make lab` walk-through: up, traffic, down")
    demo.add_argument("--kube", action="store_true", help=_KUBE_HELP + "; kubectl apply changes traffic")
    demo.set_defaults(func=_cmd_lab_demo)
    share(
        [lab, up, down, status, ex, check, mesh, config, config_check, demo],
        [
            PREFIX_OPTION,
            Shared(
                ("-o", "--output"), "output", "table", "output format (default table)", {"choices": FORMATS}
            ),
        ],
    )


def _cmd_completion(args: argparse.Namespace) -> int:
    import argcomplete

    print(argcomplete.shellcode(["ambit"], shell=args.shell))
    return 0


def add_completion(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "completion",
        "print the shell completion script",
        ('eval "$(ambit completion bash)"          # in ~/.bashrc', "ambit completion zsh > ~/.zfunc/_ambit"),
    )
    p.add_argument("shell", choices=("bash", "zsh", "fish", "tcsh"), help="shell to complete for")
    p.set_defaults(func=_cmd_completion)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambit",
        description="ambit: zero-trust mesh data plane",
        formatter_class=HelpFormatter,
        epilog=examples(
            "ambit lab up && ambit lab mesh           # a 2-node mesh in network namespaces",
            "ambit debug --node node-1 workloads      # what a node agent knows",
            "ambit debug --node node-2 all -o json",
            "ambit agent -h                           # run an agent on a real node",
            'eval "$(ambit completion bash)"          # tab completion',
        ),
    )
    parser.add_argument("--version", action="version", version=f"ambit {version()}")
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
    add_completion(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        return _closed_pipe()


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:
        import argcomplete

        argcomplete.autocomplete(parser)  # exits after printing the completions
    args = apply_defaults(parser.parse_args(argv))
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"ambit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _closed_pipe() -> int:
    # The reader went away (`ambit lab status | head`): not an error of ours. Point stdout at /dev/null so
    # the interpreter's final flush does not raise again, and exit as a process killed by SIGPIPE would.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
