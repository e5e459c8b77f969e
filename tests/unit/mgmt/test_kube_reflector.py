"""The watch stream reader over a real chunked HTTP response: events split as chunks arrive, lines bounded."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3

from mgmt.kube.reflector import MAX_LINE_BYTES, ResourceType, _lines, object_name


def _chunked(chunks: list[bytes]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for c in chunks:
                self.wfile.write(f"{len(c):x}\r\n".encode() + c + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextmanager
def _serve(chunks: list[bytes]) -> Iterator[urllib3.BaseHTTPResponse]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _chunked(chunks))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        http = urllib3.PoolManager()
        yield http.request("GET", f"http://127.0.0.1:{server.server_address[1]}/", preload_content=False)
    finally:
        server.shutdown()
        server.server_close()


def test_events_split_across_and_within_chunks() -> None:
    with _serve([b'{"a":1}\n{"b"', b':2}\n\n{"c":3}']) as resp:
        assert list(_lines(resp)) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']


def test_an_event_longer_than_the_bound_is_a_broken_stream() -> None:
    chunk = b"x" * (1024 * 1024)
    with (
        _serve([chunk] * (MAX_LINE_BYTES // len(chunk) + 2)) as resp,
        pytest.raises(RuntimeError, match="larger"),
    ):
        list(_lines(resp))


def test_paths_and_names() -> None:
    assert ResourceType("Pod", "v1", "pods").path == "/api/v1/pods"
    ap = ResourceType("AuthorizationPolicy", "security.istio.io/v1", "authorizationpolicies")
    assert ap.path == "/apis/security.istio.io/v1/authorizationpolicies"
    assert object_name({"metadata": {"name": "n", "namespace": "ns"}}) == "ns/n"
    assert object_name({"metadata": {"name": "node-1"}}) == "node-1"
