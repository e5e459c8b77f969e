"""popen_in from a process that runs gRPC: no Python runs between fork and exec, so gRPC's fork handlers
(whose restarted poller aborted children: rc -6, no output) never run, and each child starts inside the
namespace."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from agent.lab import fabric

pytestmark = pytest.mark.root

CHILDREN = 50

SCRIPT = textwrap.dedent(
    """
    import concurrent.futures, json, os, sys
    import grpc
    from agent import netns
    from agent.lab import fabric

    name = sys.argv[1]
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    rcs, inside = [], 0
    for _ in range(int(sys.argv[2])):
        proc = netns.popen_in(name, ["sleep", "0.05"])
        inside += proc.pid in fabric.pids_in_netns(name)
        rcs.append(proc.wait())
    server.stop(None)
    print(json.dumps({"rcs": rcs, "inside": inside}))
    """
)


def test_popen_in_runs_no_fork_handlers_and_enters_the_namespace(lab_prefix: str) -> None:
    import json

    from agent import netns

    name = f"{lab_prefix}popen"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, name, str(CHILDREN)], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result == {"rcs": [0] * CHILDREN, "inside": CHILDREN}
        # gRPC logs each fork it sees; a vfork-and-exec child (no preexec_fn) is invisible to it.
        assert "fork" not in out.stderr, out.stderr
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert not netns.path_of(name).exists()
    assert fabric.pids_in_netns(name) == []
