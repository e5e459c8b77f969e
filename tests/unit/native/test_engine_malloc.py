"""The engine owns its host process's malloc policy (native/src/loop.c): set when it is loaded, and the heap
trimmed after a burst of closes, whichever kind closed (connections, streams on a pooled connection)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from engine_testkit import Events, Pki, tunnel

from native.engine import Engine

ARENAS_CHILD = r"""
import ctypes, tempfile, threading
import native.engine  # noqa: F401  (its malloc policy applies from here on)
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
THREADS = 8
gate = threading.Barrier(THREADS + 1)
def allocate():
    held = [bytearray(4000) for _ in range(100)]  # > 512 bytes: glibc malloc, not pymalloc
    gate.wait()
    gate.wait()
threads = [threading.Thread(target=allocate) for _ in range(THREADS)]
for t in threads: t.start()
gate.wait()  # every thread holds its allocations
with tempfile.NamedTemporaryFile("r") as out:
    f = libc.fopen(out.name.encode(), b"w")
    libc.malloc_info(0, f)
    libc.fclose(f)
    print(out.read().count("<heap nr="))
gate.wait()
for t in threads: t.join()
"""


def test_threads_of_the_host_share_at_most_two_arenas() -> None:
    # Without the engine's policy glibc gives each of the 8 threads its own arena (9 with the main one).
    out = subprocess.run([sys.executable, "-c", ARENAS_CHILD], capture_output=True, text=True, check=True)
    assert 1 <= int(out.stdout) <= 2, out.stdout


def test_streams_closing_on_a_pooled_connection_trim(engine: Engine, events: Events, pki: Pki) -> None:
    # 40 streams on one HBONE connection: 80 stream closes (both ends), no connection closed. The engine
    # used to count only connections, so a pool's streams coming and going never trimmed.
    t = tunnel(engine, events, pki)
    held: list[socket.socket] = []
    for _ in range(40):
        app, upstream, _, _ = t.open()
        held += [app, upstream]
    trims = engine.counters()["malloc_trims"]
    for s in held:
        s.close()
    for _ in range(80):
        events.kind("stream_closed")
    deadline = time.monotonic() + 10
    # The burst's trim, then one more once it is over (for what closed after it).
    while engine.counters()["malloc_trims"] < trims + 2:
        assert time.monotonic() < deadline, f"trims {engine.counters()['malloc_trims'] - trims}, want 2"
        events.drain()
        time.sleep(0.05)
    assert engine.counters()["conns_active"] == 2


def test_the_heap_is_trimmed_once_after_start_up() -> None:
    # What the host's start-up freed (imports, TLS contexts, the first config) goes back: ~1 MiB per agent.
    eng = Engine(threads=1)
    eng.start()
    try:
        deadline = time.monotonic() + 10
        while eng.counters()["malloc_trims"] == 0:
            assert time.monotonic() < deadline, "no trim after start-up"
            time.sleep(0.1)
        time.sleep(1.5)  # and only once while nothing happens
        assert eng.counters()["malloc_trims"] == 1
    finally:
        eng.stop()
