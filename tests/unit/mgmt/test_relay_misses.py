"""The relay remembers addresses a node looked up in vain (bounded), and subscribes it when they appear."""

from __future__ import annotations

from mgmt.relay_service import MAX_MISSES_PER_NODE, RelayService
from mgmt.store import ConfigStore, StoredResource, stored
from tests.relay_fixtures import TD, workload_doc


def test_missed_addresses_are_bounded_per_node_and_resolved_when_a_workload_appears() -> None:
    store = ConfigStore(None, trust_domain=TD)
    relay = RelayService(store, TD)
    for i in range(MAX_MISSES_PER_NODE + 50):
        relay._remember_miss("node-1", f"10.9.{i // 250}.{i % 250 + 1}")
    assert len(relay._misses["node-1"]) == MAX_MISSES_PER_NODE
    assert "10.9.0.1" not in relay._misses["node-1"]  # the oldest went first
    newest = f"10.9.{(MAX_MISSES_PER_NODE + 49) // 250}.{(MAX_MISSES_PER_NODE + 49) % 250 + 1}"
    res = stored(workload_doc("web-21", 2, newest), "test")
    assert isinstance(res, StoredResource)
    store.publish({str(res.key): res})
    assert relay._peers["node-1"] == {"Workload/demo/web-21"}
    assert newest not in relay._misses["node-1"]
    relay.close()
