"""Accepting on the proxy's listeners without spinning when the process runs out of file descriptors.

At the fd limit accept() fails with EMFILE while the backlog stays readable, so retrying at once turns the
control loop into a busy loop writing one warning per try (52,689 in 1.05 s were seen). Instead the
listener is paused for a short interval (the connections wait in the kernel's backlog; the engine keeps
moving bytes and closing connections, which frees fds), the event is counted, and the warning is written
at most once per interval with the number of repeats.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket
from collections.abc import Callable

from agent.proxy.lograte import RateLimitedLog
from agent.proxy.loop import ControlLoop

log = logging.getLogger("ambit.proxy")

BATCH = 64  # accepts per readiness event: one busy listener cannot starve the loop
FD_BACKOFF_S = 0.1  # pause of a listener after EMFILE: at most ten tries a second
# Out of descriptors or kernel memory: retrying before something is freed cannot succeed.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor:
    def __init__(
        self,
        loop: ControlLoop,
        counters: collections.Counter[str],
        warn: RateLimitedLog,
        backoff_s: float = FD_BACKOFF_S,
    ) -> None:
        self._loop = loop
        self._counters = counters
        self._warn = warn
        self._backoff_s = backoff_s

    def accept(self, listener: socket.socket, handle: Callable[[socket.socket], None]) -> None:
        """Accept what the backlog holds (bounded), handing each socket to `handle`."""
        for _ in range(BATCH):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._failed(listener, exc)
                return
            try:
                # Small HTTP/2 frames (HEADERS then DATA) must not wait out Nagle against a delayed ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                handle(sock)
            except OSError as exc:  # e.g. the client reset before we looked at it: common, not a bug
                log.debug("accepted connection gone: %s", exc)
                sock.close()  # no-op once the fd was handed to the engine (detached)
            except Exception:
                log.exception("handling an accepted connection failed")
                sock.close()

    def _failed(self, listener: socket.socket, exc: OSError) -> None:
        ip, port = listener.getsockname()[:2]
        where = f"{ip}:{port}"
        if exc.errno in RESOURCE_ERRNOS:
            self._counters["accept_resource_exhausted"] += 1
            self._warn.warning(
                f"accept-{exc.errno}", "accept on %s failed: %s; pausing the listener %.1f s",
                where, exc, self._backoff_s,
            )  # fmt: skip
            self._loop.pause_reader(listener.fileno(), self._backoff_s)
            return
        # ECONNABORTED, EPERM (a firewall) ...: that one connection is gone, the next may be fine.
        self._counters["accept_errors"] += 1
        self._warn.warning(f"accept-{exc.errno}", "accept on %s failed: %s", where, exc)
