"""The `ambit debug` subcommand (being built: see the open issues)."""

from __future__ import annotations

import argparse

from agent.errors import UsageError


def _not_built(_: argparse.Namespace) -> int:
    raise UsageError("`ambit debug` is not built yet")


def add_debug_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sub.add_parser("debug", help="inspect a node agent").set_defaults(func=_not_built)
