"""What the datapath programs are compiled from: bpf/<hook>.c with its local headers inlined, and the
constants shared with Python as -D flags.

bcc rewrites map accesses (`table.lookup(...)`) only in the main source text, not in included files, so
the local `#include "..."` lines of a program are expanded here into one text before compiling.
Constants shared with Python (marks, ports) are passed as -D flags from marks.py, never restated in C.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.redirect import marks

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
# One program per hook; each lives in bpf/<hook>.c with an entry function of the same name.
HOOKS = ("pod_ingress", "pod_egress", "uplink_ingress")
_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


def expand_includes(path: Path, seen: set[Path] | None = None) -> str:
    """The source of `path` with each local include inlined once (include guards stay harmless)."""
    seen = set() if seen is None else seen
    lines = []
    for line in path.read_text().splitlines():
        match = _LOCAL_INCLUDE.match(line)
        if not match:
            lines.append(line)
            continue
        included = (path.parent / match.group(1)).resolve()
        if included not in seen:
            seen.add(included)
            lines.append(expand_includes(included, seen))
    return "\n".join(lines) + "\n"


def cflags() -> list[str]:
    """Every -D flag but the pin directory (which does not change the instructions: see cache.py)."""
    return [
        f"-DAMBIT_ROUTE_MARK={marks.ROUTE_MARK:#x}",
        f"-DAMBIT_ROUTE_MASK={marks.ROUTE_MASK:#x}",
        f"-DAMBIT_AGENT_SOCKET_MARK={marks.AGENT_SOCKET_MARK:#x}",
        f"-DAMBIT_OUTBOUND_PORT={marks.OUTBOUND_PORT}",
        f"-DAMBIT_INBOUND_PLAINTEXT_PORT={marks.INBOUND_PLAINTEXT_PORT}",
        f"-DAMBIT_HBONE_PORT={marks.HBONE_PORT}",
    ]


def pin_dir_flag(pin_dir: Path) -> str:
    if '"' in str(pin_dir) or "\\" in str(pin_dir):
        raise ValueError(f"unusable pin directory {pin_dir!r}")
    return f'-DAMBIT_PIN_DIR="{pin_dir}"'


def compile_inputs(bpf_dir: Path | None = None) -> tuple[dict[str, str], list[str]]:
    """(hook -> expanded source, flags): everything the compiled instructions depend on in this tree."""
    base = BPF_DIR if bpf_dir is None else bpf_dir
    return {hook: expand_includes(base / f"{hook}.c") for hook in HOOKS}, cflags()
