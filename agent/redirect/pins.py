"""The bpffs side of the datapath: the mount, each agent's pin directory, pinning and removing objects.

Pinned maps and programs outlive the agent process, which is what lets a restarted agent pick up live
state; it also means nothing removes them but us, so `cleanup_pins` exists for `ambit lab down`.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import shutil
import subprocess
from pathlib import Path

from agent.redirect import syscall

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "ambit"
_MOUNT_LOCK = Path("/run/ambit-bpffs.lock")


class PinError(RuntimeError):
    pass


def lab_pin_dir(prefix: str, node: str) -> Path:
    """Where the lab agent of `node` pins its maps and programs."""
    return PIN_ROOT / f"{prefix}{node}"


def bpffs_mounted(mountpoint: Path = BPFFS) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(
            fields[1] == str(mountpoint) and fields[2] == "bpf"
            for fields in (line.split() for line in mounts)
            if len(fields) > 2
        )


def ensure_bpffs(mountpoint: Path = BPFFS) -> None:
    """Mount bpffs when it is not (Debian does not mount it at boot)."""
    if bpffs_mounted(mountpoint):
        return
    # Concurrent agents must not stack two mounts: pins under the lower one would be hidden.
    with open(_MOUNT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if bpffs_mounted(mountpoint):
            return
        proc = subprocess.run(
            ["mount", "-t", "bpf", "bpf", str(mountpoint)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise PinError(f"cannot mount bpffs on {mountpoint}: {proc.stderr.strip()}")


def pin_fd(fd: int, path: Path) -> None:
    """Pin a map or program, replacing an older pin at `path` (a pin cannot be overwritten in place)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    try:
        syscall.obj_pin(fd, path)
    except syscall.BpfError as exc:
        raise PinError(f"cannot pin fd {fd} at {path}: {exc.strerror}") from exc


def remove_pin_dir(pin_dir: Path) -> None:
    """Remove an agent's pins; the kernel frees each object when its last user (fd, tc filter) goes."""
    shutil.rmtree(pin_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        pin_dir.parent.rmdir()  # only when empty: other agents' directories stay


def cleanup_pins(prefix: str) -> list[str]:
    """Remove the pin directories of every lab agent with `prefix`; returns the directories removed."""
    if not PIN_ROOT.is_dir() or not prefix:
        return []
    # Exactly "<prefix>node-N": prefix "amb-" must not take the pins of a lab with prefix "amb-x-".
    own = re.compile(re.escape(prefix) + r"node-\d+")
    removed = []
    for entry in sorted(PIN_ROOT.iterdir()):
        if own.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    with contextlib.suppress(OSError):
        PIN_ROOT.rmdir()
    return removed
