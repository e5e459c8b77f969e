"""The compile cache: bcc runs once per source/kernel/bcc in a child, the agent process never maps LLVM,
a warm start reuses the cached instructions, a source change compiles again, and an entry that is
malformed or sits in a directory others can write is never loaded. The first tests need no root."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent.lab.plan import LabPlan
from agent.redirect import cache, compiler, pins, sources
from tests.integration.redirect.redirect_lab import Agent

LLVM_LIBRARIES = ("libLLVM", "libclang", "libbcc")


def _insn(opcode: int, regs: int = 0, imm: int = 0) -> bytes:
    return bytes([opcode, regs]) + b"\0\0" + imm.to_bytes(4, "little", signed=True)


# r1 = map fd 7 (ld_imm64 with src_reg 1: two instruction slots), r0 = 0 (mov), exit.
PROGRAM = _insn(0x18, 0x11, 7) + _insn(0, 0, 0) + _insn(0xB7) + _insn(0x95)


def _doc(insns: bytes = PROGRAM, refs: list[list[Any]] | None = None, pin: str = "pods") -> dict[str, Any]:
    spec = {"pin": pin, "type": 1, "key_size": 4, "value_size": 128, "max_entries": 16, "flags": 1,
            "key_fields": ["ip"], "value_fields": ["mode", "flags", "workload"]}  # fmt: skip
    encoded = base64.b64encode(insns).decode()
    program = {"license": "GPL", "insns": encoded, "maps": refs or [[0, "ambit_pods"]]}
    return {"maps": {"ambit_pods": spec}, "programs": {hook: program for hook in sources.HOOKS}}


def _write_entry(cache_dir: Path, key: str, doc: dict[str, Any]) -> None:
    (cache_dir / f"{key}.json").write_text(json.dumps({**doc, "format": cache.FORMAT, "key": key}))


def test_map_references_are_found_and_foreign_fds_refused() -> None:
    assert compiler.map_references(PROGRAM, {7: "ambit_pods"}) == [(0, "ambit_pods")]
    with pytest.raises(RuntimeError, match="fd 7"):
        compiler.map_references(PROGRAM, {8: "ambit_pods"})
    map_value = _insn(0x18, 0x21, 7) + _insn(0) + _insn(0x95)  # src_reg 2: a map value, not relocatable
    with pytest.raises(RuntimeError, match="unsupported"):
        compiler.map_references(map_value, {7: "ambit_pods"})


def test_a_good_entry_is_read_and_a_tampered_one_never(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    _write_entry(cache_dir, "good", _doc())
    assert cache._read(cache_dir / "good.json", "good") is not None
    tampered = {
        "mov-not-ld": _doc(refs=[[2, "ambit_pods"]]),  # the reference points at a plain instruction
        "out-of-range": _doc(refs=[[40, "ambit_pods"]]),
        "unknown-map": _doc(refs=[[0, "ambit_other"]]),
        "odd-length": _doc(insns=PROGRAM[:-3]),
        "escaping-pin": _doc(pin="../../etc"),
    }
    for key, doc in tampered.items():
        _write_entry(cache_dir, key, doc)
        assert cache._read(cache_dir / f"{key}.json", key) is None, key
    (cache_dir / "garbage.json").write_text("{not json")
    assert cache._read(cache_dir / "garbage.json", "garbage") is None
    _write_entry(cache_dir, "other-key", _doc())
    assert cache._read(cache_dir / "other-key.json", "expected-key") is None


def test_cache_only_in_a_private_directory(tmp_path: Path) -> None:
    private = tmp_path / "private"
    assert cache._usable(private)
    assert private.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert not cache._usable(shared)


def test_prune_keeps_the_newest_entries(tmp_path: Path) -> None:
    for i in range(cache.KEEP + 3):
        entry = tmp_path / f"k{i}.json"
        entry.write_text("{}")
        os.utime(entry, (1000 + i, 1000 + i))
    oldest = tmp_path / "k0.json"
    removed = cache.prune(tmp_path, keep=oldest)
    assert len(removed) == 2 and oldest not in removed
    assert len(list(tmp_path.glob("*.json"))) == cache.KEEP + 1


def test_the_key_follows_sources_and_flags(tmp_path: Path) -> None:
    copy = tmp_path / "bpf"
    shutil.copytree(sources.BPF_DIR, copy)
    key = cache.cache_key(copy)
    assert cache.cache_key(sources.BPF_DIR) == key  # same text, other place: the pin dir is not in it
    with open(copy / "ambit_steer.h", "a") as header:
        header.write("/* changed */\n")
    assert cache.cache_key(copy) != key


def _starts(pin_dir: str, cache_dir: str, bpf_dir: str) -> tuple[list[str], list[str]]:
    """Three starts with the datapath kept between them; the header changes before the third. Returns
    where each start's programs came from, and the compile scratch directories left behind."""
    from agent.redirect.redirector import Redirector

    origins = []
    for change in (False, False, True):
        if change:
            with open(Path(bpf_dir) / "ambit_steer.h", "a") as header:
                header.write("/* changed */\n")
        redirector = Redirector("node-x", Path(pin_dir), cache_dir=Path(cache_dir), bpf_dir=Path(bpf_dir))
        redirector.start()
        origins.append(redirector.bpf_origin)
        redirector.stop(keep_datapath=not change)
    return origins, [p.name for p in pins.PIN_ROOT.glob(f"compile-{os.getpid()}-*")]


@pytest.mark.root
def test_compiled_once_reused_then_recompiled_after_a_source_change(lab_prefix: str, tmp_path: Path) -> None:
    from pyroute2 import netns

    from agent import netns as nsx

    bpf_dir, cache_dir = tmp_path / "bpf", tmp_path / "cache"
    shutil.copytree(sources.BPF_DIR, bpf_dir)
    name = f"{lab_prefix}bare"
    pin_dir = pins.PIN_ROOT / f"{lab_prefix}node-x"
    netns.create(name)  # an empty namespace: the redirector must never touch the host's links
    try:
        origins, scratch = nsx.run_in(name, _starts, str(pin_dir), str(cache_dir), str(bpf_dir), timeout=600)
    finally:
        netns.remove(name)
        pins.remove_pin_dir(pin_dir)
    assert origins == ["compiled", "cache", "compiled"]
    assert len(list(cache_dir.glob("*.json"))) == 2
    assert scratch == []


@pytest.mark.root
def test_scratch_of_a_killed_compile_is_removed(tmp_path: Path) -> None:
    pins.ensure_bpffs()
    pins.PIN_ROOT.mkdir(exist_ok=True)
    dead, alive = pins.PIN_ROOT / "compile-999999999-ab", pins.PIN_ROOT / f"compile-{os.getpid()}-ab"
    for scratch in (dead, alive):
        scratch.mkdir()
    try:
        cache._remove_stale_scratch()
        assert not dead.exists() and alive.exists()
    finally:
        for scratch in (dead, alive):
            shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.root
def test_the_agent_process_maps_no_llvm(lab: LabPlan) -> None:
    node, pod = lab.node("node-1"), lab.pod("pod-1-1")
    with Agent(node.netns, node.name, pins.lab_pin_dir(lab.prefix, node.name)) as agent:
        agent.call("start")
        agent.call("enroll", pod.ip, "default/pod-1-1", True)
        assert agent.call("enrolled") == {pod.ip: {"workload": "default/pod-1-1", "strict": True}}
        mapped = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        agent.call("stop")
    assert [lib for lib in LLVM_LIBRARIES if lib in mapped] == []
