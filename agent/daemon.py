"""The `ambit agent` subcommand (being built: see the open issues)."""

from __future__ import annotations

import argparse

from agent.errors import UsageError


def _not_built(_: argparse.Namespace) -> int:
    raise UsageError("`ambit agent` is not built yet")


def add_agent_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sub.add_parser("agent", help="run the node agent").set_defaults(func=_not_built)
