"""Small HTTP services of the agent: metrics (:15020), readiness (:15021), and the base the admin API uses.

Each runs a ThreadingHTTPServer, on its own daemon thread (`start`, what tests use side by side on port 0)
or with others on one accepting thread (`ServiceGroup`, what the agent uses for its three ports); every
request is served on a thread of its own either way.
"""

from __future__ import annotations

import ipaddress
import logging
import selectors
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

log = logging.getLogger(__name__)

METRICS_LISTEN = "0.0.0.0:15020"
READINESS_LISTEN = "0.0.0.0:15021"
READY_PATH = "/healthz/ready"
_MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]  # first value of each parameter
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Route = Callable[[Request], Response]


def split_listen(listen: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port); raises ValueError with the offending text."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address {listen!r} is not HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class HttpService:
    """Serves `route(request)` on `listen` until stop(); a route that raises answers 500 and is logged."""

    def __init__(self, name: str, listen: str, route: Route) -> None:
        self.name = name
        self._address = split_listen(listen)
        self._route = route
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{self.name} server is not started")
        return int(self._server.server_address[1])

    def bind(self) -> ThreadingHTTPServer:
        """Listen without serving (a ServiceGroup accepts); start() is bind plus a thread of its own."""
        if self._server is None:
            host, _ = self._address
            server_cls = _Server6 if ":" in host else _Server
            self._server = server_cls(self._address, self._handler_class())
            self._server.timeout = 0  # handle_request() from a group: only called once readable
            log.info("%s listening on %s:%d", self.name, host, self.port)
        return self._server

    def start(self) -> None:
        if self._server is not None:
            return
        server = self.bind()
        # A short poll: stop() waits for the loop to notice, and an agent has 2 s to exit on SIGTERM.
        self._thread = threading.Thread(target=server.serve_forever, args=(0.1,), name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if self._thread is not None:  # shutdown() waits for serve_forever, which a group member never runs
            server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "ambit"

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def _serve(self, method: str) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                try:
                    length = min(int(self.headers.get("Content-Length") or 0), _MAX_BODY)
                except ValueError:
                    self._answer(text(400, "bad Content-Length\n"))
                    return
                body = self.rfile.read(length) if length > 0 else b""
                try:
                    resp = service._route(Request(method, url.path, query, body))
                except Exception as exc:
                    log.exception("%s: %s %s failed", service.name, method, url.path)
                    resp = Response(500, f"internal error: {type(exc).__name__}\n".encode())
                self._answer(resp)

            def _answer(self, resp: Response) -> None:
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.content_type)
                self.send_header("Content-Length", str(len(resp.body)))
                for name, value in resp.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(resp.body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
                log.debug("%s: %s", service.name, format % args)

        return Handler


class ServiceGroup:
    """Several services accepting on one thread: a listening socket needs no thread of its own."""

    POLL_S = 0.1  # how soon stop() is noticed (an agent has 2 s to exit on SIGTERM)

    def __init__(self, name: str, services: list[HttpService]) -> None:
        self.name = name
        self._services = services
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            for service in self._services:
                server = service.bind()
                selector.register(server.socket, selectors.EVENT_READ, server)
        except BaseException:
            selector.close()
            self._close_services()
            raise
        self._thread = threading.Thread(target=self._serve, args=(selector,), name=self.name, daemon=True)
        self._thread.start()

    def _serve(self, selector: selectors.BaseSelector) -> None:
        with selector:
            while not self._stop.is_set():
                for key, _ in selector.select(self.POLL_S):
                    key.data.handle_request()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._close_services()

    def _close_services(self) -> None:
        for service in self._services:
            service.stop()


def text(status: int, body: str) -> Response:
    return Response(status, body.encode())


class MetricsServer(HttpService):
    """Prometheus text exposition of `registry` on /metrics (and /stats/prometheus, ztunnel's path)."""

    def __init__(self, registry: CollectorRegistry, listen: str = METRICS_LISTEN) -> None:
        self.registry = registry
        super().__init__("metrics", listen, self._serve)

    def _serve(self, req: Request) -> Response:
        if req.path not in ("/metrics", "/stats/prometheus"):
            return text(404, "not found: try /metrics\n")
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4)


class ReadinessServer(HttpService):
    """GET /healthz/ready: 200 when ready, else 503. Ready is `ready()` if given, else the set_ready flag."""

    def __init__(self, listen: str = READINESS_LISTEN, ready: Callable[[], bool] | None = None) -> None:
        self._ready_fn = ready
        self._flag = threading.Event()
        super().__init__("readiness", listen, self._serve)

    def set_ready(self, ready: bool = True) -> None:
        if ready:
            self._flag.set()
        else:
            self._flag.clear()

    def is_ready(self) -> bool:
        if self._ready_fn is None:
            return self._flag.is_set()
        try:
            return bool(self._ready_fn())
        except Exception:
            log.exception("readiness check failed")
            return False

    def _serve(self, req: Request) -> Response:
        if req.path != READY_PATH:
            return text(404, f"not found: try {READY_PATH}\n")
        return text(200, "ready\n") if self.is_ready() else text(503, "not ready\n")
