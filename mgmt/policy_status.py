"""status.conditions on policy objects: `kubectl get ap` shows whether the plane took each one, and why not.

One condition, type `Accepted`: True (reason Accepted) when the object is in force, False (reason Invalid,
the checker's message) when it was skipped. `observedGeneration` says which edit the verdict is about, so a
stale True is never read as approval of a newer spec. Other controllers' conditions are kept.

A write happens only when the object does not already carry this verdict for its generation: relists, plane
restarts and the MODIFIED events our own status writes cause cost nothing. Writes run on one thread from a
bounded queue (the informers never wait on the API server); when it is full the verdict is dropped and
counted, and written at the next relist or edit of the object.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ambit.mgmt.status")

CONDITION = "Accepted"
QUEUE_SIZE = 256
MAX_MESSAGE = 4096
PLURALS = {
    "AuthorizationPolicy": "authorizationpolicies",
    "PeerAuthentication": "peerauthentications",
    "RegoPolicy": "regopolicies",
    "MeshConfig": "meshconfigs",
    "WafPolicy": "wafpolicies",
}


@dataclass(frozen=True)
class _Write:
    group: str
    version: str
    plural: str
    namespace: str
    name: str
    body: dict[str, Any]


def accepted_condition(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cond in ((obj.get("status") or {}).get("conditions")) or ():
        if isinstance(cond, Mapping) and cond.get("type") == CONDITION:
            return cond
    return None


def _status_body(obj: Mapping[str, Any], problem: str | None) -> dict[str, Any] | None:
    """The merge patch that records the verdict, or None when the object already carries it."""
    generation = (obj.get("metadata") or {}).get("generation") or 0
    status = "True" if problem is None else "False"
    message = "in force" if problem is None else problem[:MAX_MESSAGE]
    current = accepted_condition(obj)
    if (
        current is not None
        and current.get("status") == status
        and current.get("message") == message
        and current.get("observedGeneration") == generation
    ):
        return None
    if current is not None and current.get("status") == status:
        transition = current.get("lastTransitionTime")  # the verdict did not flip: keep when it last did
    else:
        transition = None
    condition = {
        "type": CONDITION,
        "status": status,
        "reason": "Accepted" if problem is None else "Invalid",
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": transition or dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    others = [
        c
        for c in ((obj.get("status") or {}).get("conditions")) or ()
        if isinstance(c, Mapping) and c.get("type") != CONDITION
    ]
    return {"status": {"observedGeneration": generation, "conditions": [*others, condition]}}


class StatusWriter:
    def __init__(self, api_client: Any) -> None:
        self.api = api_client
        self.counters = {"status_queued": 0, "status_written": 0, "status_dropped": 0, "status_errors": 0}
        self._queue: queue.Queue[_Write] = queue.Queue(QUEUE_SIZE)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def report(self, obj: Mapping[str, Any], problem: str | None) -> None:
        """Record that the plane took `obj` (problem None) or skipped it for `problem`."""
        plural = PLURALS.get(str(obj.get("kind")))
        md = obj.get("metadata") or {}
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        if plural is None or not md.get("name") or not group:
            return
        body = _status_body(obj, problem)
        if body is not None:
            self.submit(group, version, plural, str(md.get("namespace") or ""), str(md["name"]), body)

    def submit(
        self, group: str, version: str, plural: str, namespace: str, name: str, body: dict[str, Any]
    ) -> None:
        """Queue one merge patch of an object's status subresource (mgmt/kube/gateway_status builds the
        Gateway API's)."""
        try:
            self._queue.put_nowait(_Write(group, version, plural, namespace, name, body))
            self.counters["status_queued"] += 1
        except queue.Full:
            self.counters["status_dropped"] += 1

    def _run(self) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = client.CustomObjectsApi(self.api)
        while not self._stopping.is_set():
            try:
                w = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            merge: dict[str, Any] = {"_content_type": "application/merge-patch+json", "_request_timeout": 5}
            try:
                if w.namespace:
                    api.patch_namespaced_custom_object_status(
                        w.group, w.version, w.namespace, w.plural, w.name, w.body, **merge
                    )
                else:
                    api.patch_cluster_custom_object_status(
                        w.group, w.version, w.plural, w.name, w.body, **merge
                    )
                self.counters["status_written"] += 1
            except ApiException as exc:
                if exc.status == 404:
                    continue  # deleted meanwhile: nothing to report on
                self.counters["status_errors"] += 1
                log.warning(
                    "cannot write the status of %s %s/%s: HTTP %s", w.plural, w.namespace, w.name, exc.status
                )
            except Exception as exc:
                self.counters["status_errors"] += 1
                log.warning("cannot write the status of %s %s/%s: %s", w.plural, w.namespace, w.name, exc)
