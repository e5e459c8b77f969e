import socket
import threading

from agent.proxy.loop import ControlLoop


def test_call_soon_runs_on_the_loop_thread_and_readers_fire() -> None:
    loop = ControlLoop(name="test-loop")
    ran: list[str] = []
    done = threading.Event()
    a, b = socket.socketpair()
    try:

        def on_readable() -> None:
            ran.append(f"read:{a.recv(16).decode()}:{threading.current_thread().name}")
            done.set()

        loop.add_reader(a.fileno(), on_readable)
        loop.start()
        loop.call_soon(lambda: ran.append(f"soon:{threading.current_thread().name}"))
        b.sendall(b"x")
        assert done.wait(5)
        with loop.lock:
            assert "soon:test-loop" in ran and "read:x:test-loop" in ran
    finally:
        loop.stop()
        a.close()
        b.close()


def test_failing_callback_is_counted_and_loop_survives() -> None:
    loop = ControlLoop(name="test-loop")
    done = threading.Event()
    loop.start()
    try:

        def fails() -> None:
            raise RuntimeError("bug in a callback")

        loop.call_soon(fails)
        loop.call_soon(done.set)
        assert done.wait(5)
        assert loop.callback_errors == 1
    finally:
        loop.stop()
