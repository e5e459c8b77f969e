"""`--limit NAME=N`: per-peer limits over the defaults, each checked at parse time (one owner each)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.errors import UsageError
from agent.proxy.limits import ENGINE_LIMITS, Budgets, Limits
from agent.settings import AgentSettings, add_arguments
from native.engine import LIMITS


def _settings(tmp_path: Path, *extra: str) -> AgentSettings:
    (tmp_path / "bundle.pem").write_text("x")
    (tmp_path / "token").write_text("t")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--node", "n1", "--mgmt", "h:15012", "--bootstrap", "h:15013"]
    base += ["--trust-bundle", str(tmp_path / "bundle.pem"), "--join-token-file", str(tmp_path / "token")]
    return AgentSettings.from_args(parser.parse_args([*base, *extra]))


def test_defaults_and_overrides(tmp_path: Path) -> None:
    assert _settings(tmp_path).limits == Limits()
    s = _settings(tmp_path, "--limit", "hbone_streams_per_identity=10", "--limit", "hbone-resets-per-s=0")
    assert (s.limits.hbone_streams_per_identity, s.limits.hbone_resets_per_s) == (10, 0)
    engine = s.limits.engine()
    assert engine["streams_per_peer"] == 10 and engine["resets_per_s"] == 0


@pytest.mark.parametrize(
    ("item", "why"),
    [
        ("nonsense=1", "NAME one of"),
        ("hbone_streams_per_identity", "NAME one of"),
        ("hbone_streams_per_identity=-1", "integer >= 0"),
        ("hbone_streams_per_identity=ten", "integer >= 0"),
        ("hbone_stream_buffer=100", "16384"),
        ("hbone_max_concurrent_streams=0", ">= 1"),
    ],
)
def test_bad_limits_are_usage_errors(tmp_path: Path, item: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        _settings(tmp_path, "--limit", item)


def test_every_limit_has_exactly_one_owner() -> None:
    """The engine's limits map onto distinct engine names covering all of them; the proxy's budgets are
    the remaining fields, none of which the engine enforces."""
    assert sorted(ENGINE_LIMITS.values()) == sorted(LIMITS)
    budgets = {b.name for b in Budgets(Limits()).all()}
    assert budgets.isdisjoint(ENGINE_LIMITS)
    assert budgets | set(ENGINE_LIMITS) == set(Limits.names())
