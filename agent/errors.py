"""Errors shared across the agent. A UsageError is the user's mistake: the CLI prints it on one line, exit 2."""


class UsageError(Exception):
    """Bad input from the operator (arguments, names, sizes)."""
