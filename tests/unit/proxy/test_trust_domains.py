"""Which identities name a workload here: this mesh's trust domain and MeshConfig's aliases, nothing else."""

from __future__ import annotations

import pytest

from agent.state import MeshSnapshot
from api.resources import ResourceError, load_kinds, parse
from api.spiffe import SpiffeId, TrustDomains

load_kinds()


def _mesh(**spec: object) -> object:
    return parse({"apiVersion": "ambit.io/v1", "kind": "MeshConfig", "metadata": {"name": "m"}, "spec": spec})


def test_workload_identities_of_accepted_domains_only() -> None:
    trust = MeshSnapshot.from_objects(1, "td.local", "n", [_mesh(trustDomainAliases=["old.td"])]).trust
    assert trust == TrustDomains("td.local", frozenset({"old.td"}))
    ours = SpiffeId.parse("spiffe://td.local/ns/app/sa/web")
    assert trust.workload(ours) == ours
    # An alias maps onto this mesh's domain: policies and source recovery see one identity.
    assert trust.workload(SpiffeId.parse("spiffe://old.td/ns/app/sa/web")) == ours
    for other in (
        "spiffe://evil.example/ns/app/sa/web",
        "spiffe://td.local/node/n1",
        "spiffe://td.local/mgmt",
    ):
        assert trust.workload(SpiffeId.parse(other)) is None
    assert not trust.accepts(SpiffeId.parse("spiffe://evil.example/ns/app/sa/web"))
    assert MeshSnapshot(trust_domain="td.local").trust.aliases == frozenset()


def test_bad_alias_is_a_config_error() -> None:
    with pytest.raises(ResourceError, match="trustDomainAliases"):
        _mesh(trustDomainAliases=["Not A Domain"])
