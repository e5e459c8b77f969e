"""Compiles the tc programs with bcc, in a short-lived child:
`python -m agent.redirect.compiler PIN_DIR BPF_DIR`.

The only place bcc (and with it ~120 MB of LLVM/clang) is imported. The child compiles every hook of
sources.HOOKS and prints one JSON artifact on stdout: each program's instructions as bcc rewrote them,
where each map is referenced in them (bcc puts its own map fds into `ld_imm64` instructions; the agent
puts its fds there instead), and each map's definition and C field names (for maps.py's layout check).
bcc must create the maps to compile: it does so in PIN_DIR, a scratch bpffs directory the parent
removes; the agent's real pins are never touched here.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.redirect import sources, syscall
from agent.redirect.cache import BPF_LD_IMM64, BPF_PSEUDO_MAP_FD


def _fields(ctype: Any) -> list[str]:
    return [f[0] for f in getattr(ctype, "_fields_", [])]


def _tables(bpf: Any) -> dict[str, int]:
    """Table name -> this module's fd of it."""
    from bcc.libbcc import lib

    lib.bpf_num_tables.restype = ctypes.c_ulonglong
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    names = [lib.bpf_table_name(bpf.module, i).decode() for i in range(lib.bpf_num_tables(bpf.module))]
    return {name: int(lib.bpf_table_fd(bpf.module, name.encode())) for name in names}


def map_references(insns: bytes, fd_names: dict[int, str]) -> list[tuple[int, str]]:
    """(instruction index, map name) of every map fd loaded by `insns`; fails on any other fd."""
    refs = []
    index = 0
    while index * 8 < len(insns):
        opcode, regs = insns[index * 8], insns[index * 8 + 1]
        if opcode == BPF_LD_IMM64:
            src = regs >> 4
            imm = int.from_bytes(insns[index * 8 + 4 : index * 8 + 8], "little", signed=True)
            if src == BPF_PSEUDO_MAP_FD:
                if imm not in fd_names:
                    raise RuntimeError(f"instruction {index} loads fd {imm}, which is none of the maps")
                refs.append((index, fd_names[imm]))
            elif src != 0:  # map values, BTF ids, ...: nothing the agent knows how to relocate
                raise RuntimeError(f"instruction {index}: unsupported ld_imm64 source {src}")
            index += 2
        else:
            index += 1
    return refs


def _pinned_names(pin_dir: Path) -> dict[int, str]:
    """Map id -> pin file name, for the maps bcc pinned in the scratch directory."""
    out = {}
    for entry in pin_dir.iterdir():
        fd = syscall.obj_get(entry)
        try:
            out[int(syscall.fdinfo(fd)["map_id"])] = entry.name
        finally:
            os.close(fd)
    return out


def compile_all(pin_dir: Path, bpf_dir: Path) -> dict[str, Any]:
    from bcc import BPF, __version__
    from bcc.libbcc import lib

    texts, flags = sources.compile_inputs(bpf_dir)
    maps: dict[str, dict[str, Any]] = {}
    programs: dict[str, dict[str, Any]] = {}
    modules = []
    for hook, text in texts.items():
        bpf = BPF(text=text, cflags=[*flags, sources.pin_dir_flag(pin_dir)])
        modules.append(bpf)
        tables = _tables(bpf)
        insns = bpf.dump_func(hook.encode())
        programs[hook] = {
            "license": lib.bpf_module_license(bpf.module).decode(),
            "insns": base64.b64encode(insns).decode(),
            "maps": map_references(insns, {fd: name for name, fd in tables.items()}),
        }
        pinned = _pinned_names(pin_dir)
        for name, fd in tables.items():
            info = syscall.fdinfo(fd)
            table = bpf.get_table(name)
            maps[name] = {
                "pin": pinned.get(int(info["map_id"]), ""),
                "type": int(info["map_type"]),
                "key_size": int(info["key_size"]),
                "value_size": int(info["value_size"]),
                "max_entries": int(info["max_entries"]),
                "flags": int(info["map_flags"], 0),
                "key_fields": _fields(table.Key),
                # Per-CPU maps: bcc's Leaf is the array of all CPUs' values, sLeaf the declared value.
                "value_fields": _fields(getattr(table, "sLeaf", table.Leaf)),
            }
    for bpf in modules:
        bpf.cleanup()
    return {"bcc": __version__, "kernel": os.uname().release, "maps": maps, "programs": programs}


def main(argv: list[str]) -> int:
    json.dump(compile_all(Path(argv[0]), Path(argv[1])), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
