"""The engine's connects to pods from a client's address share source ports across destinations, in a
network namespace of its own (test_engine_ports.py runs it under `unshare --net`).

It narrows the ephemeral port range to 2 unused ports, holds two streams to one upstream through
`accept_connect` from 127.0.0.1 (both ports in use), then accepts a stream to a second upstream from the
same address and prints, as JSON, the kinds of the events that answered each. Before, the engine bound
(address, 0), which reserves a port against every destination (TIME_WAIT sockets too): the third connect
failed at bind; now the port is chosen at connect (IP_BIND_ADDRESS_NO_PORT), unique per 4-tuple, as an
ordinary client's is."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from engine_testkit import Events, make_pki, tunnel  # noqa: E402

from agent.proxy.sockets import connect_nonblocking  # noqa: E402
from native.engine import Engine, EngineError  # noqa: E402

ANSWERS = ("stream_accepted", "upstream_failed")


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    servers = [socket.create_server(("127.0.0.1", port)) for port in (9001, 9002)]
    engine = Engine(threads=1)
    engine.start()
    events = Events(engine)
    t = tunnel(engine, events, make_pki())  # its loopback pair takes ports of the default range
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
        f.write("50000 50001")
    out: list[str] = []
    held = []
    for server in (servers[0], servers[0], servers[1]):
        app, local = socket.socketpair()
        held.append(app)
        engine.open_stream(t.client, "127.0.0.1:9001", local.detach())
        req = events.kind("stream_request", conn_id=t.server)
        try:
            engine.accept_connect(t.server, req.stream_id, server.getsockname(), "127.0.0.1", 0)
        except EngineError as e:
            out.append(f"refused: {e}")
            continue
        answer = events.wait(lambda e, r=req: e.stream_id == r.stream_id and e.kind in ANSWERS)
        out.append(answer.kind if answer.kind == "stream_accepted" else f"{answer.kind}: {answer.detail}")
    # The agent's own connects from a client's address (agent/proxy/sockets.py) share ports the same way.
    try:
        sock = connect_nonblocking(servers[1].getsockname(), "127.0.0.1")
        out.append("agent connect started")
        sock.close()
    except OSError as e:
        out.append(f"agent connect: {e}")
    engine.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
