"""Compiled datapath programs, cached on disk and keyed by what determines the instructions.

Key: the expanded source of every hook, the compile flags (marks, ports; not the pin directory, which
only tells bcc where to create maps), the kernel release (bcc compiles against its headers), the bcc
version and this artifact format. A warm start reads one small JSON file and never runs bcc; any change
of the key compiles again, in a child process (compiler.py), so LLVM is never mapped into the agent.

The cache holds code the agent (root) loads into the kernel, so it is used only in a directory that
this user owns and nobody else can write; anything else, or an entry that does not parse, compiles
afresh. At most KEEP entries stay (older kernels' and versions' entries go first).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.redirect import pins, sources

log = logging.getLogger(__name__)

FORMAT = 1
DEFAULT_DIR = Path("/var/cache/ambit/bpf")
DIR_ENV = "AMBIT_BPF_CACHE_DIR"  # overrides DEFAULT_DIR (benches measure a cold start with an empty one)
KEEP = 4
COMPILE_TIMEOUT_S = 180.0
ROOT = Path(__file__).resolve().parents[2]
BPF_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: a 16-byte instruction loading a 64-bit immediate
BPF_PSEUDO_MAP_FD = 1  # its src_reg when that immediate is a map fd


class CacheError(RuntimeError):
    pass


@dataclass(frozen=True)
class MapSpec:
    name: str
    pin: str  # file name in the agent's pin directory
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    key_fields: tuple[str, ...]  # the C struct's field names (empty for scalars)
    value_fields: tuple[str, ...]


@dataclass(frozen=True)
class ProgramSpec:
    hook: str
    license: str
    insns: bytes
    map_refs: tuple[tuple[int, str], ...]  # (index of an ld_imm64 loading a map fd, map name)


@dataclass(frozen=True)
class Artifact:
    key: str
    maps: dict[str, MapSpec]
    programs: dict[str, ProgramSpec]
    origin: str = "cache"  # "cache" or "compiled"


def bcc_version() -> str:
    try:
        return importlib.metadata.version("bcc")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(bpf_dir: Path) -> str:
    texts, flags = sources.compile_inputs(bpf_dir)
    digest = hashlib.sha256()
    for part in (str(FORMAT), os.uname().release, bcc_version(), *flags):
        digest.update(part.encode() + b"\0")
    for hook, text in sorted(texts.items()):
        digest.update(hook.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()


def _parse(key: str, doc: dict[str, Any]) -> Artifact:
    """The artifact in `doc`, checked so that a bad entry can never become a bad program."""
    maps = {
        name: MapSpec(
            name=name,
            pin=_pin_name(str(m["pin"])),
            map_type=int(m["type"]),
            key_size=int(m["key_size"]),
            value_size=int(m["value_size"]),
            max_entries=int(m["max_entries"]),
            flags=int(m["flags"]),
            key_fields=tuple(str(f) for f in m["key_fields"]),
            value_fields=tuple(str(f) for f in m["value_fields"]),
        )
        for name, m in doc["maps"].items()
    }
    programs = {}
    for hook in sources.HOOKS:
        p = doc["programs"][hook]
        insns = base64.b64decode(p["insns"], validate=True)
        refs = tuple((int(i), str(n)) for i, n in p["maps"])
        _check_refs(hook, insns, refs, maps)
        programs[hook] = ProgramSpec(hook, str(p["license"]), insns, refs)
    return Artifact(key, maps, programs)


def _pin_name(name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad pin name {name!r}")
    return name


def _check_refs(hook: str, insns: bytes, refs: tuple[tuple[int, str], ...], maps: dict[str, MapSpec]) -> None:
    if not insns or len(insns) % 8:
        raise ValueError(f"{hook}: {len(insns)} bytes of instructions")
    for index, name in refs:
        if name not in maps:
            raise ValueError(f"{hook}: instruction {index} refers to unknown map {name!r}")
        if not 0 <= index < len(insns) // 8 - 1:
            raise ValueError(f"{hook}: map reference at instruction {index} is out of range")
        if insns[index * 8] != BPF_LD_IMM64 or insns[index * 8 + 1] >> 4 != BPF_PSEUDO_MAP_FD:
            raise ValueError(f"{hook}: instruction {index} does not load a map fd")


def _usable(cache_dir: Path) -> bool:
    """Ours alone: owned by this user, not writable by group or others (the entries become kernel code)."""
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = cache_dir.stat()
    except OSError as exc:
        log.warning("BPF cache %s unusable (%s): compiling without it", cache_dir, exc)
        return False
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning("BPF cache %s is not private to this user: compiling without it", cache_dir)
        return False
    return True


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One compiler at a time per cache: agents starting together compile once, the others read it."""
    with open(cache_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read(path: Path, key: str) -> Artifact | None:
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or doc.get("key") != key:
            raise ValueError("format or key differs")
        return _parse(key, doc)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("BPF cache entry %s unusable (%s): compiling again", path, exc)
        return None


def _write(cache_dir: Path, key: str, doc: dict[str, Any]) -> None:
    path = cache_dir / f"{key}.json"
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({**doc, "format": FORMAT, "key": key}, out)
    tmp.replace(path)
    prune(cache_dir, keep=path)


def prune(cache_dir: Path, keep: Path | None = None) -> list[Path]:
    """Remove all but the KEEP newest entries (never `keep`); returns what went."""
    entries = sorted(cache_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = [p for p in entries[KEEP:] if p != keep]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _remove_stale_scratch() -> None:
    """Scratch directories of compiles whose agent was killed mid-way (their maps are pinned there)."""
    for entry in pins.PIN_ROOT.glob("compile-*-*"):
        pid = entry.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(entry, ignore_errors=True)


def compile_in_child(bpf_dir: Path) -> dict[str, Any]:
    """Run compiler.py in a child process against a scratch pin directory; its JSON artifact."""
    pins.ensure_bpffs()
    _remove_stale_scratch()
    # bpffs refuses dots in names (kernel/bpf/inode.c reserves them).
    scratch = pins.PIN_ROOT / f"compile-{os.getpid()}-{secrets.token_hex(4)}"
    scratch.mkdir(parents=True, mode=0o700)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "agent.redirect.compiler", str(scratch), str(bpf_dir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CacheError(f"compiling the BPF programs took over {COMPILE_TIMEOUT_S:.0f} s") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise CacheError(f"compiling the BPF programs failed (exit {proc.returncode}):\n{tail}")
    try:
        doc: dict[str, Any] = json.loads(proc.stdout)
    except ValueError as exc:
        raise CacheError(f"the BPF compiler printed no artifact: {exc}") from exc
    return doc


def artifact(cache_dir: Path | None = None, bpf_dir: Path | None = None) -> Artifact:
    """The compiled programs for this source, kernel and bcc: from the cache, else compiled (and cached)."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)
    bpf_dir = sources.BPF_DIR if bpf_dir is None else bpf_dir
    key = cache_key(bpf_dir)
    if not _usable(cache_dir):
        return _compiled(key, compile_in_child(bpf_dir))
    with _locked(cache_dir):
        cached = _read(cache_dir / f"{key}.json", key)
        if cached is not None:
            return cached
        doc = compile_in_child(bpf_dir)
        result = _compiled(key, doc)
        _write(cache_dir, key, doc)
    log.info("BPF programs compiled and cached as %s", cache_dir / f"{key}.json")
    return result


def _compiled(key: str, doc: dict[str, Any]) -> Artifact:
    try:
        parsed = _parse(key, doc)
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"the BPF compiler's artifact is malformed: {exc}") from exc
    return Artifact(parsed.key, parsed.maps, parsed.programs, origin="compiled")
