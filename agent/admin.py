"""The agent's admin API (ztunnel's :15000): what the node holds, as JSON, for `ambit debug` and operators.

It binds to loopback unless told otherwise, because it shows the node's whole view of the mesh. Every
answer passes through api.jsonlog.redact, so no private key or token is ever served even if a provider
hands over an object that holds one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from agent.observe.servers import HttpService, Request, Response, is_loopback, split_listen
from api.jsonlog import redact

log = logging.getLogger(__name__)

ADMIN_LISTEN = "127.0.0.1:15000"
# Path -> provider name. Providers are plain callables the daemon registers (e.g. relay snapshot, proxy rows).
ENDPOINTS = {
    "/config_dump": "config_dump",
    "/workloads": "workloads",
    "/services": "services",
    "/reachable": "reachable",
    "/policies": "policies",
    "/certs": "certs",
    "/trust_bundle": "trust_bundle",
    "/connections": "connections",
    "/bpf": "bpf",
    "/threads": "threads",
    "/memory": "memory",
}
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class AdminError(ValueError):
    pass


def set_root_log_level(level: str) -> str:
    """The default /logging setter: Python's root logger. Returns the level now in force."""
    name = level.strip().lower()
    if name == "warn":
        name = "warning"
    if name not in LOG_LEVELS:
        raise AdminError(f"unknown log level {level!r} (choose {', '.join(LOG_LEVELS)})")
    logging.getLogger().setLevel(name.upper())
    return name


def current_root_log_level() -> str:
    return logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()


def _json(status: int, value: Any) -> Response:
    body = json.dumps(redact(value), indent=2, ensure_ascii=False) + "\n"
    return Response(status, body.encode(), "application/json")


class AdminServer(HttpService):
    def __init__(
        self,
        listen: str = ADMIN_LISTEN,
        providers: Mapping[str, Callable[[], Any]] | None = None,
        log_level_setter: Callable[[str], str] | None = None,
        allow_non_loopback: bool = False,
    ) -> None:
        host, _ = split_listen(listen)
        if not is_loopback(host) and not allow_non_loopback:
            raise AdminError(
                f"admin API would listen on {host}, which is not a loopback address; it exposes the node's "
                "configuration, so bind 127.0.0.1 (or pass allow_non_loopback=True deliberately)"
            )
        self.providers = dict(providers or {})
        self._set_level = log_level_setter or set_root_log_level
        self._level = current_root_log_level()
        super().__init__("admin", listen, self._serve)

    def _serve(self, req: Request) -> Response:
        if req.path in ("/", ""):
            return _json(200, {"endpoints": [*ENDPOINTS, "/logging"]})
        if req.path == "/logging":
            return self._logging(req)
        name = ENDPOINTS.get(req.path.rstrip("/"))
        if name is None:
            return _json(404, {"error": f"no endpoint {req.path}", "endpoints": [*ENDPOINTS, "/logging"]})
        if req.method != "GET":
            return _json(405, {"error": f"{req.path} is read-only: use GET"})
        provider = self.providers.get(name)
        if provider is None:
            return _json(
                404, {"error": f"{req.path}: this agent has no {name} provider (component not running)"}
            )
        try:
            return _json(200, provider())
        except Exception as exc:
            log.exception("admin provider %s failed", name)
            return _json(500, {"error": f"{req.path}: {type(exc).__name__}: {exc}"})

    def _logging(self, req: Request) -> Response:
        level = req.query.get("level")
        if level is None:
            if req.method == "POST":
                return _json(400, {"error": "POST /logging needs ?level=" + "|".join(LOG_LEVELS)})
            return _json(200, {"level": self._level})
        try:
            self._level = self._set_level(level)
        except (ValueError, KeyError) as exc:
            return _json(400, {"error": str(exc)})
        log.warning("log level set to %s through the admin API", self._level)
        return _json(200, {"level": self._level})
