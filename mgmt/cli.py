"""The `ambit mgmt` subcommand (being built: see the open issues)."""

from __future__ import annotations

import argparse

from agent.errors import UsageError


def _not_built(_: argparse.Namespace) -> int:
    raise UsageError("`ambit mgmt` is not built yet")


def add_mgmt_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sub.add_parser("mgmt", help="run the management plane").set_defaults(func=_not_built)
