"""Errors shared across the agent.

A UsageError is the operator's mistake: the CLI prints it on one line and exits 2.
"""


class UsageError(Exception):
    """Bad input from the operator (arguments, names, sizes)."""
