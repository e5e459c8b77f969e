"""The proxy's control loop: one thread that accepts, watches connects and drains engine events.

Only control work runs here (accept, lookups, policy, handing fds to the engine); the bytes never pass
through Python. Every callback runs with `lock` held, so other threads (admin, policy re-check) take the
same lock to read or change the proxy's tables.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.proxy.sockets import connect_result

log = logging.getLogger("ambit.proxy")

CONNECT_TIMEOUT = 10.0
TICK = 1.0
_NEVER = float("inf")

ConnectDone = Callable[[socket.socket, int], None]  # (socket, 0 or errno)


@dataclass
class _Connect:
    sock: socket.socket
    done: ConnectDone
    deadline: float


class ControlLoop:
    def __init__(self, name: str = "ambit-proxy") -> None:
        self.lock = threading.RLock()
        self._name = name
        # epoll itself, not selectors: its select() builds a SelectorKey list per wake-up.
        self._sel = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._paused: dict[int, float] = {}  # reader fd -> when to watch it again
        self._connects: dict[int, _Connect] = {}
        self._tickers: list[Callable[[], None]] = []
        self._soon: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, select.EPOLLIN)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.callback_errors = 0

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._readers[fd] = callback
        self._sel.register(fd, select.EPOLLIN)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None and self._paused.pop(fd, None) is None:
            self._unwatch(fd)

    def pause_reader(self, fd: int, seconds: float) -> None:
        """Stop watching reader `fd` for `seconds` (e.g. a listener at the fd limit: its backlog stays
        readable, and retrying at once would spin the loop), then watch it again."""
        if fd in self._readers and fd not in self._paused:
            self._unwatch(fd)
            self._paused[fd] = time.monotonic() + seconds

    def _resume_readers(self, now: float) -> None:
        if not self._paused:  # the common case, per wake-up
            return
        for fd in [fd for fd, at in self._paused.items() if at <= now]:
            del self._paused[fd]
            if fd in self._readers:
                self._sel.register(fd, select.EPOLLIN)

    def every_tick(self, callback: Callable[[], None]) -> None:
        self._tickers.append(callback)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn on the loop thread (callable from any thread, e.g. a worker that fetched a certificate)."""
        if self._stopping:
            return
        self._soon.append(fn)
        with contextlib.suppress(OSError):  # a full pipe already wakes the loop; a closed one: stopped
            os.write(self._wake_w, b"x")

    def watch_connect(self, sock: socket.socket, done: ConnectDone, timeout: float = CONNECT_TIMEOUT) -> None:
        """Call done(sock, err) once a non-blocking connect finishes (err 0) or fails or times out."""
        fd = sock.fileno()
        self._connects[fd] = _Connect(sock, done, time.monotonic() + timeout)
        self._sel.register(fd, select.EPOLLOUT)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self.lock:
            for pending in list(self._connects.values()):
                self._finish_connect(pending, errno.ECANCELED)
            self._sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self) -> None:
        next_tick = time.monotonic() + TICK
        while not self._stopping:
            timeout = max(0.0, min(next_tick, self._next_deadline()) - time.monotonic())
            ready = self._sel.poll(timeout)
            with self.lock:
                if self._stopping:
                    return
                for fd, _mask in ready:
                    self._dispatch(fd)
                now = time.monotonic()
                self._resume_readers(now)
                self._expire_connects(now)
                if now >= next_tick:
                    next_tick = now + TICK
                    for tick in self._tickers:
                        self._call(tick)

    def _dispatch(self, fd: int) -> None:
        if fd == self._wake_r:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
            while self._soon:
                self._call(self._soon.popleft())
            return
        reader = self._readers.get(fd)
        if reader is not None:
            self._call(reader)
            return
        pending = self._connects.get(fd)
        if pending is not None:
            self._finish_connect(pending, connect_result(pending.sock))

    def _next_deadline(self) -> float:
        if not (self._connects or self._paused):  # the common case, per wake-up
            return _NEVER
        connects = min((c.deadline for c in self._connects.values()), default=_NEVER)
        return min(connects, min(self._paused.values(), default=_NEVER))

    def _expire_connects(self, now: float) -> None:
        if not self._connects:
            return
        for pending in [c for c in self._connects.values() if c.deadline <= now]:
            self._finish_connect(pending, errno.ETIMEDOUT)

    def _unwatch(self, fd: int) -> None:
        with contextlib.suppress(OSError):  # closed since it was registered: epoll dropped it already
            self._sel.unregister(fd)

    def _finish_connect(self, pending: _Connect, err: int) -> None:
        fd = pending.sock.fileno()
        self._connects.pop(fd, None)
        self._unwatch(fd)
        self._call(lambda: pending.done(pending.sock, err))

    def _call(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # one bad connection must not stop the loop
            self.callback_errors += 1
            log.exception("proxy control loop callback failed")
