"""The agent joins with exactly one credential: a join token (lab, VMs) or its pod's ServiceAccount token."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent.errors import UsageError
from agent.settings import AgentSettings, add_arguments


def _settings(tmp_path: Path, *extra: str) -> AgentSettings:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("x")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--node", "n1", "--mgmt", "h:15012", "--bootstrap", "h:15013", "--trust-bundle", str(bundle)]
    return AgentSettings.from_args(parser.parse_args([*base, *extra]))


def test_service_account_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("jwt")
    s = _settings(tmp_path, "--kube-token-file", str(tmp_path / "token"))
    assert s.kube_token and s.join_token_file == tmp_path / "token"
    s = _settings(tmp_path, "--join-token-file", str(tmp_path / "token"))
    assert not s.kube_token


@pytest.mark.parametrize("flags", [(), ("--join-token-file", "T", "--kube-token-file", "T")])
def test_exactly_one_credential(tmp_path: Path, flags: tuple[str, ...]) -> None:
    (tmp_path / "T").write_text("t")
    with pytest.raises(UsageError, match="one of --join-token-file"):
        _settings(tmp_path, *[str(tmp_path / f) if f == "T" else f for f in flags])


def test_missing_token_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--kube-token-file .*: no such file"):
        _settings(tmp_path, "--kube-token-file", str(tmp_path / "absent"))
