"""The bpf(2) calls the long-lived agent needs, through ctypes: create, pin and open maps, load programs,
and read and write map elements.

This is what keeps LLVM/clang (bcc) out of the daemon: bcc only compiles, in a short-lived child
(compiler.py); the daemon loads the cached instructions and manages maps with these calls alone. Each
attr struct below is the prefix of `union bpf_attr` (include/uapi/linux/bpf.h) that its command reads;
the kernel accepts a shorter attr as long as what it does not get would be zero.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Iterator
from pathlib import Path

# __NR_bpf per architecture (arch/*/include/uapi/asm/unistd*.h; arm64 uses the generic table).
_NR_BPF = {"x86_64": 321, "aarch64": 280, "i686": 357, "armv7l": 386, "ppc64le": 361, "s390x": 351}

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
PERCPU_MAP_TYPES = frozenset({5, BPF_MAP_TYPE_PERCPU_ARRAY, 10})  # percpu hash, array, LRU hash
BPF_PROG_TYPE_SCHED_CLS = 3
OBJ_NAME_LEN = 16
LOG_SIZE = 1 << 20  # verifier log on a failed load: enough for our programs' full trace

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    pass


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * OBJ_NAME_LEN),
    ]


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # also next_key
        ("flags", ctypes.c_uint64),
    ]


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * OBJ_NAME_LEN),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


def _bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf(2): unsupported architecture {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


def _addr(buf: ctypes.Array[ctypes.c_char] | ctypes.Structure | ctypes._SimpleCData) -> int:  # type: ignore[type-arg]
    return ctypes.addressof(buf)


def obj_get(path: Path) -> int:
    """An fd of the map or program pinned at `path` (FileNotFoundError when nothing is pinned there)."""
    raw = ctypes.create_string_buffer(str(path).encode())
    attr = _ObjAttr(pathname=_addr(raw))
    try:
        return _bpf(BPF_OBJ_GET, attr, f"opening pin {path}")
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, f"no BPF object pinned at {path}") from None
        raise


def obj_pin(fd: int, path: Path) -> None:
    raw = ctypes.create_string_buffer(str(path).encode())
    _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=_addr(raw), bpf_fd=fd), f"pinning fd {fd} at {path}")


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int, name: str) -> int:
    attr = _MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        map_name=name.encode()[: OBJ_NAME_LEN - 1],
    )
    return _bpf(BPF_MAP_CREATE, attr, f"creating map {name}")


def prog_load(prog_type: int, insns: bytes, license: str, name: str) -> int:
    """Load a program; on a verifier refusal the error carries the verifier's log."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    attr = _ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(insns) // 8,
        insns=_addr(code),
        license=_addr(lic),
        prog_name=name.encode()[: OBJ_NAME_LEN - 1],
    )
    try:
        return _bpf(BPF_PROG_LOAD, attr, f"loading program {name}")
    except BpfError as first:
        if first.errno not in (errno.EACCES, errno.EINVAL):
            raise
    # Only a refusal is worth a second load with the log on: the log buffer is 1 MiB.
    log = ctypes.create_string_buffer(LOG_SIZE)
    attr.log_level, attr.log_size, attr.log_buf = 1, LOG_SIZE, _addr(log)
    try:
        return _bpf(BPF_PROG_LOAD, attr, f"loading program {name}")
    except BpfError as exc:
        tail = log.value.decode(errors="replace").strip().splitlines()[-20:]
        raise BpfError(exc.errno, f"{exc.strerror}; verifier: " + " | ".join(tail)) from None


def fdinfo(fd: int) -> dict[str, str]:
    """The kernel's description of a BPF fd (prog_id, prog_tag, map_type, key_size, ...)."""
    info = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def possible_cpus() -> int:
    """How many values a per-CPU map holds per key (the kernel sizes them by possible, not online, CPUs)."""
    count = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


class MapFd:
    """An open map: raw-bytes access by key. Typed access lives in maps.py."""

    def __init__(self, fd: int, name: str) -> None:
        info = fdinfo(fd)
        self.fd = fd
        self.name = name
        self.map_type = int(info["map_type"])
        self.key_size = int(info["key_size"])
        self.value_size = int(info["value_size"])
        self.max_entries = int(info["max_entries"])
        self.map_flags = int(info["map_flags"], 0)
        self.map_id = int(info.get("map_id", "0"))
        per_cpu = self.map_type in PERCPU_MAP_TYPES
        # A per-CPU lookup fills one value per possible CPU, each rounded up to 8 bytes.
        self.buffer_size = ((self.value_size + 7) // 8 * 8) * possible_cpus() if per_cpu else self.value_size

    def _elem(self, key: bytes, value: int = 0, flags: int = 0) -> tuple[_MapElemAttr, ctypes.Array]:  # type: ignore[type-arg]
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key of {len(key)} bytes, the map's are {self.key_size}")
        raw = ctypes.create_string_buffer(key, len(key))
        return _MapElemAttr(map_fd=self.fd, key=_addr(raw), value=value, flags=flags), raw

    def lookup(self, key: bytes) -> bytes | None:
        out = ctypes.create_string_buffer(self.buffer_size)
        attr, _keep = self._elem(key, _addr(out))
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, attr, f"looking up in map {self.name}")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return out.raw

    def update(self, key: bytes, value: bytes) -> None:
        if len(value) != self.value_size:
            raise ValueError(f"map {self.name}: value of {len(value)} bytes, the map's are {self.value_size}")
        raw = ctypes.create_string_buffer(value, len(value))
        attr, _keep = self._elem(key, _addr(raw))
        _bpf(BPF_MAP_UPDATE_ELEM, attr, f"updating map {self.name}")

    def delete(self, key: bytes) -> bool:
        attr, _keep = self._elem(key)
        try:
            _bpf(BPF_MAP_DELETE_ELEM, attr, f"deleting from map {self.name}")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def iter_keys(self) -> Iterator[bytes]:
        """Every key (GET_NEXT_KEY from none); a hash map changing meanwhile may repeat or skip some."""
        nxt = ctypes.create_string_buffer(self.key_size)
        attr = _MapElemAttr(map_fd=self.fd, key=0, value=_addr(nxt))
        cur = ctypes.create_string_buffer(self.key_size)
        for _ in range(self.max_entries):
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr, f"iterating map {self.name}")
            except BpfError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise
            key = nxt.raw
            yield key
            ctypes.memmove(cur, key, self.key_size)
            attr.key = _addr(cur)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
