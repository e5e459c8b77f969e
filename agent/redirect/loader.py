"""Loads the compiled datapath into the kernel with bpf(2) alone: opens (or creates and pins) the maps in
the agent's pin directory and loads each program with the agent's map fds put into its instructions.

The instructions come from cache.py (compiled once per source/kernel/bcc by a child running bcc), so
nothing here needs LLVM. A restarted agent finds the maps pinned by its predecessor and reuses them
(enrolment survives); a pinned map whose kernel definition differs from the compiled one is refused.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from agent.redirect import pins, syscall
from agent.redirect.cache import Artifact, MapSpec
from agent.redirect.maps import LayoutError


class LoadError(RuntimeError):
    pass


@dataclass
class LoadedProgram:
    hook: str
    fd: int
    pin: Path

    @property
    def prog_id(self) -> int:
        return int(syscall.fdinfo(self.fd).get("prog_id", "0"))

    @property
    def tag(self) -> str:
        return syscall.fdinfo(self.fd).get("prog_tag", "")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _check_pinned(spec: MapSpec, opened: syscall.MapFd, path: Path) -> None:
    """bcc used to reuse a pinned map without comparing it with the declaration; we compare every field."""
    for what, kernel, ours in (
        ("type", opened.map_type, spec.map_type),
        ("keys", opened.key_size, spec.key_size),
        ("values", opened.value_size, spec.value_size),
        ("max entries", opened.max_entries, spec.max_entries),
        ("flags", opened.map_flags, spec.flags),
    ):
        if kernel != ours:
            unit = " bytes" if what in ("keys", "values") else ""
            raise LayoutError(
                f"pinned map {spec.name!r} has {what} of {kernel}{unit}, this agent's layout "
                f"{ours}{unit}: an incompatible agent pinned it at {path}; stop that datapath without "
                "--keep-datapath first"
            )


def open_maps(artifact: Artifact, pin_dir: Path) -> dict[str, syscall.MapFd]:
    """Every map of the artifact: the one pinned in `pin_dir`, else a new one pinned there."""
    opened: dict[str, syscall.MapFd] = {}
    try:
        for name, spec in artifact.maps.items():
            path = pin_dir / spec.pin
            try:
                fd = syscall.obj_get(path)
                created = False
            except FileNotFoundError:
                fd = syscall.map_create(
                    spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags, name
                )
                created = True
            opened[name] = syscall.MapFd(fd, name)
            _check_pinned(spec, opened[name], path)
            if created:
                pins.pin_fd(fd, path)
    except BaseException:
        close_maps(opened)
        raise
    return opened


def close_maps(opened: dict[str, syscall.MapFd]) -> None:
    for m in opened.values():
        m.close()


def load(hook: str, artifact: Artifact, maps: dict[str, syscall.MapFd], pin_dir: Path) -> LoadedProgram:
    """Load `hook` as a tc classifier using `maps`, and pin it at <pin_dir>/prog_<hook>."""
    spec = artifact.programs[hook]
    insns = bytearray(spec.insns)
    for index, name in spec.map_refs:
        # ld_imm64 with src_reg BPF_PSEUDO_MAP_FD: the low 32 bits of its immediate name the map's fd.
        insns[index * 8 + 4 : index * 8 + 8] = maps[name].fd.to_bytes(4, "little")
    try:
        fd = syscall.prog_load(syscall.BPF_PROG_TYPE_SCHED_CLS, bytes(insns), spec.license, hook)
    except syscall.BpfError as exc:
        raise LoadError(f"loading {hook}: {exc}") from exc
    program = LoadedProgram(hook=hook, fd=fd, pin=pin_dir / f"prog_{hook}")
    try:
        pins.pin_fd(fd, program.pin)
    except BaseException:
        with contextlib.suppress(OSError):
            program.close()
        raise
    return program
