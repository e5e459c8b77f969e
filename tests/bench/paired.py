"""Repeated, interleaved measurements of several paths, for a noisy shared machine.

On a 2-vCPU machine shared with other work, one measurement of path A followed by one of path B compares
the machine's load at two moments as much as the paths: single runs of the same path differ by +-40%. Here
every case is measured for each path in turn, repetition after repetition (A B C, then C B A: the order
flips, so no path always runs first or last), and what is reported is the median per path, its spread, and
the median of the per-repetition ratios between two paths (each ratio compares measurements taken seconds
apart, under about the same load).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# One case: measures a path (by name) and returns its metrics, e.g. {"RR latency p50": 80.0, ...}.
Case = Callable[[str], Mapping[str, float]]
Samples = dict[str, dict[str, list[float]]]  # path -> metric -> one value per repetition


def interleave(paths: Sequence[str], cases: Sequence[Case], reps: int) -> Samples:
    samples: Samples = {p: {} for p in paths}
    for rep in range(reps):
        order = list(paths) if rep % 2 == 0 else list(reversed(paths))
        for case in cases:
            for path in order:
                for metric, value in case(path).items():
                    samples[path].setdefault(metric, []).append(value)
    return samples


def spread_pct(values: Sequence[float]) -> float:
    """(max - min) / median, in percent: how far apart the repetitions of one path landed."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid * 100 if mid else 0.0


def medians(samples: Samples) -> dict[str, float]:
    """{"path: metric": median, "path: metric, spread": spread_pct} of every path and metric."""
    out: dict[str, float] = {}
    for path, metrics in samples.items():
        for metric, values in metrics.items():
            out[f"{path}: {metric}"] = statistics.median(values)
            out[f"{path}: {metric}, spread"] = spread_pct(values)
    return out


def rows(
    samples: Samples,
    units: Mapping[str, str],
    baselines: Mapping[str, str],
    pair: tuple[str, str],
    targets: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Result rows: per path and metric the median (ratio to `baselines[path]`'s median) and its spread;
    per metric the per-repetition ratio `pair[0]`/`pair[1]` (median, lowest, highest), the median against
    `targets[metric]` when given (a target ratio row of its own, so the report's ratio says met or not)."""
    out: list[dict[str, Any]] = []
    first, second = pair
    for metric, unit in units.items():
        for path, values in samples.items():
            base = baselines.get(path)
            out.append(
                _row(
                    f"{path}: {metric}", statistics.median(values[metric]), unit, base and f"{base}: {metric}"
                )
            )
            out.append(_row(f"{path}: {metric}, spread", spread_pct(values[metric]), "%"))
        ratios = [a / b for a, b in zip(samples[first][metric], samples[second][metric], strict=True) if b]
        name = f"{first}/{second} per repetition: {metric}"
        target = (targets or {}).get(metric)
        if target is not None:
            out.append(_row(f"target: {name}", target, "x"))
        out.append(
            _row(name, statistics.median(ratios), "x", f"target: {name}" if target is not None else "")
        )
        out.append(_row(f"{name}, lowest", min(ratios), "x"))
        out.append(_row(f"{name}, highest", max(ratios), "x"))
    return out


def _row(name: str, value: float, unit: str, baseline: str | None = "") -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "baseline": baseline or ""}
