"""Budget bookkeeping: limits hold per key, refusals are counted, and the table keeps only live keys."""

from __future__ import annotations

from agent.proxy.limits import Budget, Budgets, Limits


def test_budget_refuses_only_the_full_key_and_forgets_idle_ones() -> None:
    b = Budget("x", limit=2)
    assert b.take("a") and b.take("a") and not b.take("a")
    assert b.take("b")  # another key is not affected
    assert (b.held("a"), b.held("b"), b.refused) == (2, 1, 1)
    for key in ("a", "a", "b"):
        b.give_back(key)
    assert len(b) == 0  # bounded by live work: nothing stays for keys that left


def test_zero_is_unlimited() -> None:
    b = Budget("x", limit=0)
    assert all(b.take("a") for _ in range(1000)) and b.refused == 0


def test_room_is_half_of_what_is_left_at_most_what_is_wanted() -> None:
    b = Budget("x", limit=10)
    assert b.room("a", 8) == 5
    for _ in range(9):
        b.take("a")
    assert b.room("a", 8) == 0 and b.room("b", 3) == 3  # another key has its own budget
    assert Budget("y", limit=0).room("a", 8) == 8  # unlimited


def test_every_budget_is_reported() -> None:
    counters = Budgets(Limits()).counters()
    assert set(counters) == {
        "limit_refused_hbone_waiting_per_source",
        "limit_refused_hbone_connections_per_identity",
        "limit_refused_hbone_streams_per_source",
        "limit_refused_plaintext_connections_per_source",
        "limit_refused_outbound_connections_per_source",
    }
