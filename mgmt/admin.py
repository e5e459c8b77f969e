"""The plane's admin HTTP (port 15014, istiod's monitoring port): metrics, readiness, what each node holds.

  GET /metrics         Prometheus text (mgmt/metrics.py; also at /stats/prometheus)
  GET /healthz/ready   200 once the plane serves (the chart's probes)
  GET /debug/status    the config version and, per node, the version it ACKed or NACKed (`ambit debug
                       status`, like `istioctl proxy-status`)
  GET /debug/counters  relay, CSR, bootstrap, webhook and config-source (files or kube) counters

Nothing here is secret (node names, versions, NACK messages): the chart binds it to the pod's address for
the kubelet's probes; elsewhere it stays on loopback by default.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent.observe.servers import READY_PATH, HttpService, Request, Response
from mgmt.relay_service import RelayService

ADMIN_PORT = 15014
ADMIN_LISTEN = f"127.0.0.1:{ADMIN_PORT}"
STATUS_PATH = "/debug/status"
COUNTERS_PATH = "/debug/counters"
METRICS_PATHS = ("/metrics", "/stats/prometheus")


def _json(status: int, value: Any) -> Response:
    return Response(status, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode(), "application/json")


def plane_status(relay: RelayService) -> dict[str, Any]:
    snapshot = relay.store.current
    return {"version": snapshot.version, "content_hash": snapshot.content_hash, "nodes": relay.rows()}


class PlaneAdmin(HttpService):
    def __init__(
        self,
        relay: RelayService,
        listen: str = ADMIN_LISTEN,
        counters: Mapping[str, Callable[[], Mapping[str, int]]] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._relay = relay
        self._registry = registry
        self._counters = {"relay": relay.counters, **(counters or {})}
        self._ready = threading.Event()
        super().__init__("mgmt-admin", listen, self._serve)

    def set_ready(self) -> None:
        self._ready.set()

    def _serve(self, req: Request) -> Response:
        if req.method != "GET":
            return _json(405, {"error": f"{req.path} is read-only: use GET"})
        if req.path == READY_PATH:
            ready = self._ready.is_set()
            return _json(200 if ready else 503, {"ready": ready})
        if req.path == STATUS_PATH:
            return _json(200, plane_status(self._relay))
        if req.path in METRICS_PATHS and self._registry is not None:
            return Response(200, generate_latest(self._registry), CONTENT_TYPE_LATEST)
        if req.path == COUNTERS_PATH:
            return _json(200, {name: dict(get()) for name, get in self._counters.items()})
        return _json(
            404,
            {
                "error": f"no endpoint {req.path}",
                "endpoints": [*METRICS_PATHS, READY_PATH, STATUS_PATH, COUNTERS_PATH],
            },
        )
