"""What the agent process holds in memory, for `GET :15000/memory` (`ambit debug memory`).

Totals from /proc/self/smaps_rollup (anonymous: private, what this process alone costs; file-backed:
shared libraries' pages, clean and shared with other processes), the largest mappings, and the Python
modules loaded: those an idle agent should not hold are imported only when first used (docs/footprint.md).
The process's malloc policy (mmap threshold, arenas, trimming after bursts) is the engine's
(native/src/loop.c), not this module's: the agent and the gateway both host the engine.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")
TOP_MAPPINGS = 12


def rollup(pid: int | str = "self") -> dict[str, int]:
    """/proc/PID/smaps_rollup in KiB: resident, of which anonymous and file-backed."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0])
    return {
        "rss_kib": fields["Rss"],
        "anon_kib": fields["Anonymous"],
        "file_kib": fields["Rss"] - fields["Anonymous"],
    }


def mappings(pid: int | str = "self") -> dict[str, int]:
    """Resident KiB per mapped object: a file's base name, [heap], [stack], or [anon] for the rest."""
    rss: dict[str, int] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        match = _MAPPING.match(line)
        if match:
            path = match.group(1).strip()
            name = path.rsplit("/", 1)[-1] if path.startswith("/") else (path or "[anon]")
        elif line.startswith("Rss:"):
            rss[name] = rss.get(name, 0) + int(line.split()[1])
    return rss


def report() -> dict[str, object]:
    biggest = sorted(mappings().items(), key=lambda kv: -kv[1])[:TOP_MAPPINGS]
    return {
        **rollup(),
        "mappings": [{"mapping": name, "rss_kib": kib} for name, kib in biggest],
        "python_modules": sorted(sys.modules),
    }
