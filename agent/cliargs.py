"""Options that may appear anywhere in an `ambit` command line: `ambit lab up --prefix X` and
`ambit lab --prefix X up` mean the same, as do `ambit debug --node n -o json workloads` and
`ambit debug workloads --node n -o json` (istioctl and cilium-dbg accept flags in any position).

argparse hands every level of subcommand its own namespace defaults, so an option declared at two levels
with a real default lets the inner level overwrite what the user gave the outer one. Here each shared
option is declared at every level with default SUPPRESS (absent unless given) and the real default is
filled in once, after parsing.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.lab.plan import DEFAULT_PREFIX


@dataclass(frozen=True)
class Shared:
    flags: tuple[str, ...]
    dest: str
    default: Any  # a callable is called when the option is absent (e.g. to read the environment then)
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            *self.flags, dest=self.dest, default=argparse.SUPPRESS, help=self.help, **self.kwargs
        )


# The defaults of every shared option, by dest, for apply_defaults (one option may be shared by several
# trees, e.g. --prefix by `lab` and `debug`).
_DEFAULTS: dict[str, Any] = {}


def lab_prefix() -> str:
    """The lab prefix when none is given: AMBIT_LAB_PREFIX, else the default (read when parsing)."""
    return os.environ.get("AMBIT_LAB_PREFIX", DEFAULT_PREFIX)


PREFIX_OPTION = Shared(
    ("--prefix",),
    "prefix",
    lab_prefix,
    f"name prefix of the lab's namespaces (default {DEFAULT_PREFIX}, env AMBIT_LAB_PREFIX)",
)


def share(parsers: Iterable[argparse.ArgumentParser], options: Iterable[Shared]) -> None:
    """Declare `options` on each of `parsers` (a command and all its subcommands)."""
    opts = list(options)
    for opt in opts:
        _DEFAULTS[opt.dest] = opt.default
    for parser in parsers:
        for opt in opts:
            opt.add_to(parser)


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    for dest, default in _DEFAULTS.items():
        if not hasattr(args, dest):
            setattr(args, dest, default() if callable(default) else default)
    return args


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs, so examples in help read as typed."""


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_command(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    help: str,  # noqa: A002 (argparse's own name)
    example_lines: tuple[str, ...],
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand whose help ends with examples, laid out as typed."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=HelpFormatter,
        epilog=examples(*example_lines),
    )
    return parser
