"""Warning Events on invalid objects, so `kubectl describe` / `kubectl get events` show why one is skipped.

Posting runs on its own thread from a bounded queue: the informers never wait on the API server, and a
flood of invalid objects drops Events (counted) rather than memory or time. The caller reports each
object once per resourceVersion.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import secrets
import threading
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("ambit.mgmt.kube")

QUEUE_SIZE = 256
COMPONENT = "ambit-mgmt"
REASON = "InvalidConfig"
MAX_MESSAGE = 1024  # Events hold up to 1 KiB of message
CLUSTER_EVENTS_NAMESPACE = "default"  # where Events about cluster-scoped objects go, as kubectl does


class EventRecorder:
    def __init__(self, api_client: Any) -> None:
        self.api = api_client
        self.counters = {"events_posted": 0, "events_dropped": 0, "event_errors": 0}
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(QUEUE_SIZE)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kube-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def invalid(self, obj: Mapping[str, Any], reason: str) -> None:
        md = obj.get("metadata") or {}
        if not md.get("name"):
            return
        try:
            self._queue.put_nowait(_event(obj, reason))
        except queue.Full:
            self.counters["events_dropped"] += 1

    def _run(self) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core: Any = client.CoreV1Api(self.api)  # takes the plain dict body: it serializes dicts as they are
        while not self._stopping.is_set():
            try:
                body = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                core.create_namespaced_event(body["metadata"]["namespace"], body, _request_timeout=5)
                self.counters["events_posted"] += 1
            except (ApiException, OSError, ValueError) as exc:
                self.counters["event_errors"] += 1
                log.warning("kube: cannot post an Event for %s: %s", body["involvedObject"]["name"], exc)
            except Exception:
                self.counters["event_errors"] += 1
                log.exception("kube: posting an Event")


def _event(obj: Mapping[str, Any], reason: str) -> dict[str, Any]:
    md = obj.get("metadata") or {}
    namespace = md.get("namespace") or CLUSTER_EVENTS_NAMESPACE
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    involved = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "name": md.get("name"),
        "uid": md.get("uid"),
        "resourceVersion": md.get("resourceVersion"),
    }
    if md.get("namespace"):
        involved["namespace"] = md["namespace"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{md.get('name')}.{secrets.token_hex(8)}", "namespace": namespace},
        "involvedObject": involved,
        "reason": REASON,
        "message": f"ambit skipped this object: {reason}"[:MAX_MESSAGE],
        "type": "Warning",
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
