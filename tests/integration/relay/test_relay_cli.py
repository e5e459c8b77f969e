"""`ambit mgmt` as a process: join with a token, pull config over the relay, SIGKILL + restart, resume."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.identity.bootstrap import join
from agent.relay.client import RelayClient
from mgmt.server import SERVER_NAME
from tests.ports import unused_port
from tests.relay_fixtures import Recorder, workload_doc, write_docs, write_mesh

ROOT = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT = 30.0
SYNC_TIMEOUT = 15.0
READY = re.compile(r"mgmt: relay on port (\d+), bootstrap on port (\d+)")


@contextmanager
def mgmt_process(tmp: Path, args: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run `ambit mgmt`; yields the process and its stdout+stderr log path once it is serving."""
    log = tmp / f"mgmt-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "mgmt", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not READY.search(log.read_text()):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield proc, log.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_join_pull_kill_restart(tmp_path: Path) -> None:
    config, state = tmp_path / "config", tmp_path / "state"
    write_mesh(config)
    relay_port = unused_port()
    common = ["--config-dir", str(config), "--state-dir", str(state), "--listen", f"127.0.0.1:{relay_port}"]
    with mgmt_process(tmp_path, [*common, "--bootstrap-listen", "127.0.0.1:0", "--join-token", "node-1"]) as (
        proc,
        text,
    ):
        token = re.search(r"join-token node-1 (\S+)", text)
        bootstrap_port = READY.search(text).group(2)  # type: ignore[union-attr]
        assert token is not None
        bundle = (state / "ca-bundle.pem").read_bytes()
        identity = join(f"127.0.0.1:{bootstrap_port}", token.group(1), "node-1", bundle)
        rec = Recorder()
        client = RelayClient(
            f"127.0.0.1:{relay_port}",
            "node-1",
            lambda: identity.credentials(bundle),
            on_snapshot=rec,
            server_name=SERVER_NAME,
            backoff_initial=0.05,
            backoff_max=0.5,
        )
        client.start()
        try:
            first = rec.wait_for(lambda s: s.version >= 1, SYNC_TIMEOUT)
            assert first is not None and "demo/web-11" in first.workloads
            assert "demo/web-21" not in first.workloads
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            write_docs(config / "new.yaml", [workload_doc("api-1", 1, "10.244.1.50")])
            assert client.snapshot is first  # plane gone: the last good config stays
            with mgmt_process(tmp_path, [*common, "--bootstrap-listen", "127.0.0.1:0"]):
                resumed = rec.wait_for(lambda s: "demo/api-1" in s.workloads, SYNC_TIMEOUT)
                assert resumed is not None and resumed.version == first.version + 1
                assert client.counters()["resources_received"] == _count(first) + 1  # delta, not a resend
        finally:
            client.stop()


def _count(snapshot) -> int:  # type: ignore[no-untyped-def]
    return (
        len(snapshot.workloads)
        + len(snapshot.namespaces)
        + len(snapshot.services)
        + len(snapshot.nodes)
        + len(snapshot.policies)
    )


def test_a_taken_listen_address_is_a_one_line_error(tmp_path: Path) -> None:
    import socket

    config = tmp_path / "cfg"
    config.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "agent.cli", "mgmt", "--config-dir", str(config), "--state-dir",
             str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1
    assert f"ambit mgmt: cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
