"""At the fd limit a listener backs off instead of spinning: counted, logged once per interval, resumed.

Real listener, real control loop, a real RLIMIT_NOFILE lowered for the test; the clients live in another
process so that their descriptors do not count against ours."""

from __future__ import annotations

import collections
import logging
import os
import resource
import socket
import subprocess
import sys
import time

import pytest

from agent.proxy.accept import Acceptor
from agent.proxy.lograte import RateLimitedLog
from agent.proxy.loop import ControlLoop
from tests.relay_fixtures import wait_until

CLIENTS = 40
CLIENT = """
import socket, sys
socks = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(int(sys.argv[2]))]
print("connected", flush=True)
sys.stdin.read()
"""


def test_listener_at_the_fd_limit_backs_off_and_resumes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="ambit.proxy")
    loop = ControlLoop(name="test-accept")
    counters: collections.Counter[str] = collections.Counter()
    acceptor = Acceptor(loop, counters, RateLimitedLog(logging.getLogger("ambit.proxy"), interval=30.0))
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.setblocking(False)
    held: list[socket.socket] = []
    argv = [sys.executable, "-c", CLIENT, str(listener.getsockname()[1]), str(CLIENTS)]
    clients = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert clients.stdout is not None and clients.stdout.readline().strip() == "connected"
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 5, hard))
        loop.add_reader(listener.fileno(), lambda: acceptor.accept(listener, held.append))
        loop.start()
        assert wait_until(lambda: counters["accept_resource_exhausted"] >= 1, 10)
        time.sleep(1.0)  # without the pause this second holds tens of thousands of failed accepts
        with loop.lock:
            exhausted, accepted = counters["accept_resource_exhausted"], len(held)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert 0 < accepted < CLIENTS
        assert exhausted <= 20  # ~10 tries a second (FD_BACKOFF_S 0.1), not a busy loop
        warned = [r for r in caplog.records if "pausing the listener" in r.getMessage()]
        assert len(warned) == 1  # once per interval, however many tries
        # Descriptors free again: the paused listener is watched again and drains its backlog.
        assert wait_until(lambda: len(held) == CLIENTS, 10)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        loop.stop()
        clients.communicate("", timeout=10)
        for sock in held:
            sock.close()
        listener.close()
