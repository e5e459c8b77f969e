"""Renders rows for people (aligned tables) or programs (JSON, YAML): one format switch for every command."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

FORMATS = ("table", "json", "yaml")


def render(rows: Sequence[dict[str, Any]], fmt: str = "table", columns: Sequence[str] | None = None) -> str:
    if fmt == "json":
        return json.dumps(list(rows), indent=2, default=str)
    if fmt == "yaml":
        import yaml  # only for -o yaml: every command loads this module, the node agent too

        return yaml.safe_dump(list(rows), sort_keys=False, default_flow_style=False).rstrip()
    if fmt != "table":
        raise ValueError(f"unknown output format {fmt!r} (choose {', '.join(FORMATS)})")
    cols = list(columns) if columns else (list(rows[0].keys()) if rows else [])
    if not cols:
        return "(none)"
    cells = [[c.upper() for c in cols]] + [[_cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def _cell(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)
