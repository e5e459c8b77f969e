"""Relay keepalive: an idle subscription stream survives the node's pings (shortened timers, same policy).

Before the fix the plane's ping policy was set under a misspelt gRPC argument, so its 5-minute default
applied: the node's 30 s pings earned strikes and the plane closed every stream after about 3 minutes with
GOAWAY too_many_pings. Here both ends derive their options from one `Keepalive`; the second test proves
the pings really flow (a plane stricter than its nodes does end the stream), so the first cannot pass idly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.relay.client import RelayClient
from api.keepalive import Keepalive
from mgmt.ca import CertificateAuthority
from mgmt.server import SERVER_NAME, MgmtServer, node_channel_credentials
from mgmt.store import ConfigStore
from tests.relay_fixtures import TD, Recorder, wait_until, write_mesh

FAST = Keepalive(interval_ms=200, timeout_ms=2_000)
IDLE_S = 4.0  # ~20 pings: far past the strikes a misaligned plane tolerates (2)


@contextmanager
def _stream(tmp_path: Path, ca: CertificateAuthority, plane_policy: Keepalive) -> Iterator[RelayClient]:
    write_mesh(tmp_path / "config")
    store = ConfigStore(tmp_path / "config", tmp_path / "state", trust_domain=TD)
    assert store.load() == []
    server = MgmtServer(store, ca, "127.0.0.1:0", TD, keepalive=plane_policy)
    server.start()
    client = RelayClient(
        f"127.0.0.1:{server.port}", "node-1", node_channel_credentials(ca, "node-1"), Recorder(),
        server_name=SERVER_NAME, backoff_initial=0.05, backoff_max=0.2, keepalive=FAST,
    )  # fmt: skip
    client.start()
    try:
        assert wait_until(lambda: client.connected and client.version > 0, 10)
        yield client
    finally:
        client.stop()
        server.stop()
        store.stop()


def test_idle_relay_stream_is_not_closed_for_its_pings(tmp_path: Path, ca: CertificateAuthority) -> None:
    with _stream(tmp_path, ca, FAST) as client:
        time.sleep(IDLE_S)
        assert client.counters()["reconnects"] == 0, client.last_error
        assert client.connected and client.last_error == ""


def test_a_plane_stricter_than_its_nodes_ends_the_stream(tmp_path: Path, ca: CertificateAuthority) -> None:
    strict_plane = Keepalive(interval_ms=60_000, timeout_ms=2_000)  # allows one ping per 30 s
    with _stream(tmp_path, ca, strict_plane) as client:
        assert wait_until(lambda: client.counters()["reconnects"] >= 1, IDLE_S + 6)
        assert "too many pings" in client.last_error.lower()
