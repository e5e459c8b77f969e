"""Entering network namespaces: run a function or a program inside one.

Python 3.11 has no os.setns, so libc's setns is called through ctypes. setns(CLONE_NEWNET) changes only
the calling thread, so callers run in a forked child (run_in) or through nsenter (popen_in): the caller's
own namespace is never changed.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

NETNS_DIR = Path("/run/netns")
NSENTER = "/usr/bin/nsenter"  # util-linux, on every Debian system
ENTER_TIMEOUT = 5.0
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class NetnsError(RuntimeError):
    pass


def path_of(name: str) -> Path:
    return NETNS_DIR / name


def enter(name: str) -> None:
    """Move the calling thread into netns `name` (use only in a child process)."""
    fd = os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in(name: str, fn: Callable[..., T], *args: Any, timeout: float = 60.0) -> T:
    """Run fn(*args) in a forked child inside netns `name` and return its (picklable) result."""
    if not path_of(name).exists():
        raise NetnsError(f"network namespace {name!r} does not exist")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        try:
            enter(name)
            payload = pickle.dumps((True, fn(*args)))
        except BaseException as exc:  # the parent re-raises it with the child's traceback
            payload = pickle.dumps((False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        with os.fdopen(wfd, "wb") as out:
            out.write(payload)
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    if not data:
        raise NetnsError(f"child in {name} died without a result")
    ok, value = pickle.loads(data)
    if not ok:
        raise NetnsError(f"in netns {name}: {value}")
    return value  # type: ignore[no-any-return]


def popen_in(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start argv inside netns `name`; kwargs go to subprocess.Popen."""
    if not path_of(name).exists():
        raise NetnsError(f"network namespace {name!r} does not exist")
    # nsenter rather than a preexec_fn: Python code between fork and exec runs gRPC's fork handlers, whose
    # restarted poller thread aborts the child once close_fds closes its epoll fd (seen: rc -6, no output).
    # nsenter execs argv itself, so the returned pid is argv's; it is waited for until it is inside the
    # namespace, as a child that entered before exec would be (callers may look it up there at once).
    proc = subprocess.Popen([NSENTER, f"--net={path_of(name)}", "--", *argv], **kwargs)
    target = os.stat(path_of(name))
    deadline = time.monotonic() + ENTER_TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            st = os.stat(f"/proc/{proc.pid}/ns/net")
        except OSError:
            break
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            break
        time.sleep(0.001)
    return proc


def exec_in(name: str, argv: Sequence[str]) -> None:
    """Replace this process with argv running inside netns `name` (for `ambit lab exec`)."""
    enter(name)
    os.execvp(argv[0], list(argv))
