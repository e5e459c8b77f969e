"""`ambit agent` against a real plane: a refused join is one clear line and exit 1, not a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

AMBIT = [sys.executable, "-m", "agent.cli"]


def test_agent_with_a_bogus_token_exits_with_the_planes_reason(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    plane = subprocess.Popen(
        [*AMBIT, "mgmt", "--config-dir", str(tmp_path / "cfg"), "--state-dir", str(tmp_path / "state")]
        + ["--listen", "127.0.0.1:0", "--bootstrap-listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert plane.stderr is not None
        ports = None
        for line in plane.stderr:
            ports = re.search(r"relay on port (\d+), bootstrap on port (\d+)", line)
            if ports:
                break
        assert ports, "the plane never said where it listens"
        token = tmp_path / "token"
        token.write_text("not-a-real-token\n")
        agent = subprocess.run(
            [*AMBIT, "agent", "--node", "node-1", "--mgmt", f"127.0.0.1:{ports[1]}"]
            + [
                "--bootstrap",
                f"127.0.0.1:{ports[2]}",
                "--trust-bundle",
                str(tmp_path / "state" / "ca-bundle.pem"),
            ]
            + ["--join-token-file", str(token), "--no-redirect", "--admin", "127.0.0.1:0"]
            + ["--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert agent.returncode == 1
        assert "cannot join the mesh" in agent.stderr and "UNAUTHENTICATED" in agent.stderr
        assert "Traceback" not in agent.stderr
        assert "not-a-real-token" not in agent.stderr  # tokens are secrets: never logged
    finally:
        plane.terminate()
        plane.wait(timeout=10)
