"""Compiles and loads the tc programs of bpf/ with bcc, with their maps pinned in the agent's directory.

bcc rewrites map accesses (`table.lookup(...)`) only in the main source text, not in included files, so
the local `#include "..."` lines of a program are expanded here into one text before compiling.
Constants shared with Python (marks, ports) are passed as -D flags from marks.py, never restated in C.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.redirect import marks, pins

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
# One program per hook; each lives in bpf/<hook>.c with an entry function of the same name.
HOOKS = ("pod_ingress", "pod_egress", "uplink_ingress")
_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


class LoadError(RuntimeError):
    pass


@dataclass
class LoadedProgram:
    hook: str
    bpf: Any  # bcc.BPF: keeps the program and map fds open
    fd: int
    pin: Path

    @property
    def prog_id(self) -> int:
        return int(pins.fdinfo(self.fd).get("prog_id", "0"))

    @property
    def tag(self) -> str:
        return pins.fdinfo(self.fd).get("prog_tag", "")

    def table(self, name: str) -> Any:
        return self.bpf.get_table(name)

    def close(self) -> None:
        self.bpf.cleanup()


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


def cflags(pin_dir: Path) -> list[str]:
    return [
        f'-DAMBIT_PIN_DIR="{pin_dir}"',
        f"-DAMBIT_ROUTE_MARK={marks.ROUTE_MARK:#x}",
        f"-DAMBIT_ROUTE_MASK={marks.ROUTE_MASK:#x}",
        f"-DAMBIT_AGENT_SOCKET_MARK={marks.AGENT_SOCKET_MARK:#x}",
        f"-DAMBIT_OUTBOUND_PORT={marks.OUTBOUND_PORT}",
        f"-DAMBIT_INBOUND_PLAINTEXT_PORT={marks.INBOUND_PLAINTEXT_PORT}",
        f"-DAMBIT_HBONE_PORT={marks.HBONE_PORT}",
    ]


def load(hook: str, pin_dir: Path) -> LoadedProgram:
    """Compile bpf/<hook>.c, load it as a tc classifier and pin it at <pin_dir>/prog_<hook>."""
    from bcc import BPF  # imported late: only the datapath needs bcc (and its clang)

    if '"' in str(pin_dir) or "\\" in str(pin_dir):
        raise LoadError(f"unusable pin directory {pin_dir!r}")
    source = BPF_DIR / f"{hook}.c"
    try:
        bpf = BPF(text=expand_includes(source), cflags=cflags(pin_dir))
    except Exception as exc:
        raise LoadError(f"compiling {source}: {exc}") from exc
    program = LoadedProgram(hook=hook, bpf=bpf, fd=-1, pin=pin_dir / f"prog_{hook}")
    try:
        program.fd = bpf.load_func(hook.encode(), BPF.SCHED_CLS).fd
        pins.pin_fd(program.fd, program.pin)
    except Exception as exc:
        program.close()
        raise LoadError(f"loading {source}: {exc}") from exc
    return program
