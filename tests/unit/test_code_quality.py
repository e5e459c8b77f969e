"""The tree stays ruff- and mypy-clean (STYLE.md); a failure names the file and line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PATHS = ["agent", "mgmt", "api", "native", "gateway", "tests"]


def test_ruff_clean() -> None:
    proc = subprocess.run([str(BIN / "ruff"), "check", *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_clean() -> None:
    proc = subprocess.run(
        [str(BIN / "mypy"), "agent", "mgmt", "api", "native", "gateway"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
