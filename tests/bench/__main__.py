"""Runs every benchmark module and prints one table and one JSON document.

Each result row: name, value, unit, and a baseline measured in the same run (baseline, baseline_value) with
the ratio value/baseline_value. Machines are shared and noisy, so ratios are what to compare, not absolutes.
Usage: python -m tests.bench [AREA ...]   (AREA = the part after bench_, e.g. policy)
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
import traceback
from typing import Any

import tests.bench as pkg
from agent.output import render


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)


def _with_ratios(area: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill baseline_value and ratio from the named baseline row of the same area."""
    by_name = {r["name"]: r for r in results}
    out = []
    for r in results:
        row = {"area": area, **r}
        base = by_name.get(r.get("baseline") or "")
        if base is not None:
            row["baseline_value"] = base.get("value")
            bv, v = base.get("value"), r.get("value")
            if isinstance(bv, int | float) and isinstance(v, int | float) and bv:
                row["ratio"] = v / bv
        out.append(row)
    return out


def main(argv: list[str]) -> int:
    wanted = set(argv)
    areas = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("bench_"))
    rows: list[dict[str, Any]] = []
    failed = []
    for name in areas:
        area = name.removeprefix("bench_")
        if wanted and area not in wanted:
            continue
        print(f"bench: {area} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            results = importlib.import_module(f"tests.bench.{name}").run()
        except Exception:
            traceback.print_exc()
            failed.append(area)
            continue
        print(f"bench: {area} done in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
        rows.extend(_with_ratios(area, results))
    table = [
        {
            "area": r["area"],
            "name": r["name"],
            "value": _fmt(r.get("value")),
            "unit": r.get("unit", ""),
            "baseline": r.get("baseline", ""),
            "baseline_value": _fmt(r.get("baseline_value")),
            "ratio": _fmt(r.get("ratio")),
        }
        for r in rows
    ]
    print(render(table))
    print(json.dumps(rows, indent=2, default=str))
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
