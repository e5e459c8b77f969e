"""Every thread of the agent process, by name: Python's and the native ones (engine loops, gRPC core).

Python 3.11 does not give its threads an OS name, so `top -H` and /proc show them all as "python";
`name_os_threads` copies each Python thread's name to the kernel (pthread_setname_np, 15 characters),
and `rows()` is what `ambit debug threads` shows: one row per kernel task of this process.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

_libc = ctypes.CDLL(None)
_libc.pthread_setname_np.argtypes = [ctypes.c_ulong, ctypes.c_char_p]
NAME_MAX = 15  # TASK_COMM_LEN - 1


def name_os_threads() -> None:
    """Give each live Python thread its OS name (idempotent; threads started later need another call)."""
    for thread in threading.enumerate():
        if thread.ident is not None and thread is not threading.main_thread():
            _libc.pthread_setname_np(thread.ident, thread.name.encode()[:NAME_MAX])


def tids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def name_native(since: set[int], name: str) -> None:
    """Name the native threads started since `since` (a tids() taken before): e.g. the engine's loops."""
    python = {t.native_id for t in threading.enumerate()}
    for tid in sorted(tids() - since - python):
        try:
            Path(f"/proc/self/task/{tid}/comm").write_text(name[:NAME_MAX])
        except OSError:  # ended meanwhile
            continue


def rows() -> list[dict[str, object]]:
    name_os_threads()
    python = {t.native_id: t.name for t in threading.enumerate()}
    out = []
    for task in sorted(Path("/proc/self/task").iterdir(), key=lambda p: int(p.name)):
        tid = int(task.name)
        try:
            comm = (task / "comm").read_text().strip()
        except FileNotFoundError:  # ended meanwhile
            continue
        name = python.get(tid)
        out.append(
            {"tid": tid, "name": name or comm, "kind": "python" if name else "native", "os_name": comm}
        )
    return out
