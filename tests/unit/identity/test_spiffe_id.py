"""api.spiffe: workload IDs are built once per (domain, namespace, account) and still validated."""

from __future__ import annotations

import pytest

from api.spiffe import SpiffeId, SpiffeIdError


def test_workload_ids_are_cached_and_equal_a_parse() -> None:
    first = SpiffeId.workload("cluster.local", "shop", "cart")
    assert first is SpiffeId.workload("cluster.local", "shop", "cart")  # parsed once, not per stream
    assert first == SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
    assert SpiffeId.workload("cluster.local", "shop", "carts") != first


@pytest.mark.parametrize(("td", "ns", "sa"), [("Bad.Td", "a", "b"), ("td", "..", "b"), ("td", "a", "")])
def test_a_bad_workload_id_raises_every_time(td: str, ns: str, sa: str) -> None:
    for _ in range(2):  # a failure is not cached as a value
        with pytest.raises(SpiffeIdError):
            SpiffeId.workload(td, ns, sa)
