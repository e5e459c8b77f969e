"""Killing and restarting the plane (same state dir, same CA) loses nothing; agents resume with a delta."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mgmt.ca import CertificateAuthority
from tests.relay_fixtures import TD, relay_client, start_plane, wait_until, write_mesh

SYNC_TIMEOUT = 15.0


def _wait(pred: Callable[[], object]) -> bool:
    return wait_until(pred, SYNC_TIMEOUT)


def test_restart_resumes_from_acked_version_with_a_delta(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate_root(TD)
    config, state = tmp_path / "config", tmp_path / "state"
    write_mesh(config)
    first = start_plane(config, state, ca)
    listen = first.target
    with relay_client(listen, ca, "node-1") as (client, rec):
        synced = rec.wait_for(lambda s: s.version == first.store.version, SYNC_TIMEOUT)
        assert synced is not None
        assert client.lookup("10.244.2.2") is not None  # a peer held across the restart
        assert _wait(lambda: first.server.relay.acked_version("node-1") == synced.version)
        assert _wait(lambda: "Workload/demo/web-21" in client._held)
        first.stop()
        assert _wait(lambda: not client.connected)
        assert client.snapshot.version == synced.version  # last good config stays in force

        # While the plane is down, one workload changes.
        path = config / "node-1.yaml"
        path.write_text(path.read_text().replace("- 8080", "- 9090", 1))

        second = start_plane(config, state, ca, listen=listen)
        try:
            assert second.store.version == synced.version + 1  # versions continue, never restart at 1
            moved = rec.wait_for(lambda s: s.version == synced.version + 1, SYNC_TIMEOUT)
            assert moved is not None
            assert moved.workloads["demo/web-11"].ports == (9090,)
            assert moved.workloads["demo/web-21"].node == "node-2"  # the looked-up peer is still there
            counters = second.server.relay.counters()
            assert counters["resumed_streams"] >= 1
            assert counters["full_responses"] == 0
            assert counters["resources_sent"] == 1  # only the changed workload, not a full resend
        finally:
            second.stop()


def test_restart_without_changes_sends_nothing(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate_root(TD)
    config, state = tmp_path / "config", tmp_path / "state"
    write_mesh(config)
    first = start_plane(config, state, ca)
    listen = first.target
    with relay_client(listen, ca, "node-2") as (client, rec):
        synced = rec.wait_for(lambda s: s.version == first.store.version, SYNC_TIMEOUT)
        assert synced is not None
        assert _wait(lambda: first.server.relay.acked_version("node-2") == synced.version)
        first.stop()
        second = start_plane(config, state, ca, listen=listen)
        try:
            assert second.store.version == synced.version
            assert _wait(lambda: second.server.relay.counters()["streams"] >= 1)
            # The plane's first answer on a stream says "current" (and marks the client connected).
            assert _wait(lambda: client.connected and second.server.relay.counters()["acks"] == 1)
            counters = second.server.relay.counters()
            assert counters["resources_sent"] == 0 and counters["removals_sent"] == 0
            assert client.snapshot is synced
        finally:
            second.stop()
