"""`ambit agent` stops promptly on SIGTERM even while it is still joining, and logs JSON lines on request."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mgmt.ca import CertificateAuthority

AMBIT = [sys.executable, "-m", "agent.cli"]


def _closed_port() -> int:
    # A port nothing listens on: the join keeps retrying (UNAVAILABLE), the slowest stage to leave.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_while_joining_exits_cleanly_with_json_logs(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(CertificateAuthority.generate_root("cluster.local").bundle_pem())
    token = tmp_path / "token"
    token.write_text("jt-never-logged\n")
    port = _closed_port()
    agent = subprocess.Popen(
        [
            *AMBIT,
            "agent",
            "--node",
            "node-1",
            "--mgmt",
            f"127.0.0.1:{port}",
            "--bootstrap",
            f"127.0.0.1:{port}",
        ]
        + ["--trust-bundle", str(bundle), "--join-token-file", str(token), "--no-redirect"]
        + ["--admin", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0"]
        + ["--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert agent.stderr is not None
    lines = []
    for line in agent.stderr:  # until the join is retrying
        lines.append(line)
        if "retrying" in line:
            break
    agent.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    # The old agent took its whole 30 s join timeout; the bound here only keeps a hang from blocking.
    _, rest = agent.communicate(timeout=15)
    print(f"SIGTERM while joining to exit: {time.monotonic() - sent:.2f} s")
    assert agent.returncode == 0
    records = [json.loads(line) for line in [*lines, *rest.splitlines()] if line.strip()]
    assert {"time", "level", "scope", "msg"} <= set(records[0])
    assert any(r["msg"].startswith("joining as node node-1") for r in records)
    assert any(r["level"] == "warning" and "retrying" in r["msg"] for r in records)
    assert any("shutting down" in r["msg"] for r in records)
    assert "jt-never-logged" not in "".join(lines) + rest
