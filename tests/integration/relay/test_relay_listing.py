"""The plane's listing of every workload (`ambit debug reachable`): minimal form, and nothing joins the
node's subscription, unlike a lookup."""

from __future__ import annotations

from mgmt.ca import CertificateAuthority
from mgmt.scope import MAX_LISTED
from tests.relay_fixtures import Plane, relay_client

SYNC_TIMEOUT = 15.0


def test_listing_is_every_workload_in_minimal_form_and_subscribes_nothing(
    plane: Plane, ca: CertificateAuthority
) -> None:
    with relay_client(plane.target, ca, "node-1") as (client, rec):
        assert rec.wait_for(lambda s: s.version == plane.store.version, SYNC_TIMEOUT) is not None
        listed = {w.uid: w for w in client.reachable()}
        everything = {w.uid for w in plane.store.current.workloads()}
        assert set(listed) == everything and "other/secret-db" in listed
        assert dict(listed["other/secret-db"].labels) == {"app": "secret"}  # peers' minimal form
        # Nothing was added to the node's view or its subscription.
        assert "other/secret-db" not in client.snapshot.workloads
        rows = plane.server.relay.rows()
        assert next(r for r in rows if r["node"] == "node-1")["peers"] == 0
        assert plane.server.relay.counters()["listings"] == 1
        assert len(listed) <= MAX_LISTED
