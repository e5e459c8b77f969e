"""tests/bench/paired.py: the order of interleaved repetitions and the rows made of them."""

from __future__ import annotations

from tests.bench import paired


def test_interleave_alternates_the_order_and_keeps_one_value_per_repetition() -> None:
    calls: list[tuple[str, str]] = []

    def case(name: str) -> paired.Case:
        def measure(path: str) -> dict[str, float]:
            calls.append((name, path))
            return {name: float(len(calls))}

        return measure

    samples = paired.interleave(("a", "b", "c"), [case("x"), case("y")], reps=2)
    assert calls == [
        ("x", "a"), ("x", "b"), ("x", "c"), ("y", "a"), ("y", "b"), ("y", "c"),
        ("x", "c"), ("x", "b"), ("x", "a"), ("y", "c"), ("y", "b"), ("y", "a"),
    ]  # fmt: skip
    assert samples["a"] == {"x": [1.0, 9.0], "y": [4.0, 12.0]}
    assert samples["c"] == {"x": [3.0, 7.0], "y": [6.0, 10.0]}


def test_rows_give_medians_spread_and_per_repetition_ratios_against_the_target() -> None:
    samples = {
        "ambit": {"tput": [3.0, 6.0, 4.0]},
        "stunnel": {"tput": [2.0, 2.0, 4.0]},
    }
    rows = {
        r["name"]: r
        for r in paired.rows(
            samples, {"tput": "Gbit/s"}, {"ambit": "stunnel"}, ("ambit", "stunnel"), {"tput": 1.5}
        )
    }
    assert rows["ambit: tput"]["value"] == 4.0 and rows["ambit: tput"]["baseline"] == "stunnel: tput"
    assert rows["stunnel: tput"]["value"] == 2.0 and rows["stunnel: tput"]["baseline"] == ""
    assert rows["ambit: tput, spread"]["value"] == 75.0  # (6 - 3) / 4
    name = "ambit/stunnel per repetition: tput"
    # per repetition: 1.5, 3.0, 1.0 (not the 2.0 the medians' ratio gives)
    assert rows[name]["value"] == 1.5 and rows[name]["baseline"] == f"target: {name}"
    assert rows[f"target: {name}"]["value"] == 1.5
    assert rows[f"{name}, lowest"]["value"] == 1.0 and rows[f"{name}, highest"]["value"] == 3.0
