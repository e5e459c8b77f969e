"""`make image` without a usable builder says so (exit 1) instead of failing somewhere in a build."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.integration.deploy.conftest import REPO


def test_no_builder_is_a_clear_message(tmp_path: Path) -> None:
    # A PATH with only what the script itself needs: no docker, podman or buildah on it.
    for tool in ("bash", "dirname"):
        found = shutil.which(tool)
        assert found is not None
        os.symlink(found, tmp_path / tool)
    out = subprocess.run(
        [str(tmp_path / "bash"), str(REPO / "scripts" / "build-image.sh")],
        env={"PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "no image builder on this machine: install docker, podman or buildah" in out.stderr
    assert "Dockerfile" in out.stderr
