"""The `ambit` command line itself: options in any position, --version, completion, help, closed pipes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import build_parser
from agent.cliargs import apply_defaults

AMBIT = [sys.executable, "-m", "agent.cli"]


def parse(*argv: str) -> dict[str, object]:
    return vars(apply_defaults(build_parser().parse_args(list(argv))))


@pytest.mark.parametrize(
    "argv",
    [
        ("lab", "up", "--prefix", "x1-"),
        ("lab", "--prefix", "x1-", "up"),
        ("lab", "status", "--prefix", "x1-", "-o", "json"),
        ("lab", "-o", "json", "--prefix", "x1-", "status"),
        ("lab", "config", "--prefix", "x1-", "check", "-o", "json"),
    ],
)
def test_lab_options_anywhere(argv: tuple[str, ...]) -> None:
    args = parse(*argv)
    assert args["prefix"] == "x1-"
    if "-o" in argv:
        assert args["output"] == "json"


@pytest.mark.parametrize(
    "argv",
    [
        ("debug", "--node", "n", "-o", "json", "workloads"),
        ("debug", "workloads", "--node", "n", "-o", "json"),
        ("debug", "--node", "n", "workloads", "-o", "json"),
    ],
)
def test_debug_options_anywhere(argv: tuple[str, ...]) -> None:
    args = parse(*argv)
    assert (args["node"], args["output"], args["view"]) == ("n", "json", "workloads")


def test_defaults_when_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse("debug", "certs")
    assert (args["node"], args["output"], args["admin"]) == ("", "table", "127.0.0.1:15000")
    assert parse("lab", "status")["output"] == "table"


def test_exec_keeps_the_command_options() -> None:
    args = parse("lab", "exec", "pod-1-1", "--", "curl", "-o", "/dev/null", "--prefix", "p")
    assert args["command"][-5:] == ["curl", "-o", "/dev/null", "--prefix", "p"]  # type: ignore[index]
    assert args["prefix"] != "p"


def test_version() -> None:
    out = subprocess.run([*AMBIT, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("ambit 0.")


def test_help_has_examples() -> None:
    for argv in ([], ["lab"], ["debug"], ["agent"], ["mgmt"], ["completion"], ["gateway"]):
        out = subprocess.run([*AMBIT, *argv, "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0
        assert re.search(r"examples:\n  .*ambit ", out.stdout), argv


def test_completion(tmp_path: Path) -> None:
    script = subprocess.run([*AMBIT, "completion", "bash"], capture_output=True, text=True, timeout=30)
    assert script.returncode == 0 and "complete " in script.stdout and "ambit" in script.stdout
    # What the shell does on <TAB>: argcomplete's protocol, answered by the real parser.
    out = tmp_path / "completions"
    line = "ambit lab st"
    env = os.environ | {
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_IFS": "\n",
        "COMP_LINE": line,
        "COMP_POINT": str(len(line)),
        "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
    }
    done = subprocess.run(AMBIT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert [c.strip() for c in out.read_text().split("\n")] == ["status"]
    line = "ambit debug --node n "
    env |= {"COMP_LINE": line, "COMP_POINT": str(len(line))}
    subprocess.run(AMBIT, env=env, capture_output=True, text=True, timeout=30, check=True)
    assert {"workloads", "certs", "all", "log-level"} <= {c.strip() for c in out.read_text().split("\n")}


def test_closed_pipe_is_no_traceback() -> None:
    # A reader that is already gone: every write fails with EPIPE (what `ambit ... | head` ends in).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run(
            [*AMBIT, "completion", "bash"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
    assert out.returncode == 141


def test_prefix_default_read_when_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    monkeypatch.setenv("AMBIT_LAB_PREFIX", "env1-")
    assert vars(apply_defaults(parser.parse_args(["lab", "status"])))["prefix"] == "env1-"
    assert vars(apply_defaults(parser.parse_args(["debug", "--node", "n", "certs"])))["prefix"] == "env1-"
    monkeypatch.delenv("AMBIT_LAB_PREFIX")
    assert vars(apply_defaults(parser.parse_args(["lab", "status"])))["prefix"] == "amb-"
