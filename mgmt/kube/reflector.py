"""List + watch of one resource type, with client-go's informer semantics, over raw JSON.

- List (paginated) gives the full set and a resourceVersion: each object goes to the handler as it is
  read (one page of 500 in memory at a time, not 5,000 pods), then `retain` names the whole set, which
  stands for the deletions that happened while we were not watching (a relist after a gap).
- Watch from that resourceVersion with bookmarks on: every event and bookmark moves the version forward,
  so a reconnect resumes exactly where the stream stopped (nothing missed, nothing replayed twice).
- 410 Gone (the version was compacted away, or a restarted API server's watch cache does not reach back
  that far) means relist. Other failures retry the watch from the same version with capped, jittered
  exponential backoff; a 404 on a list means the CRD is not installed: an empty set, checked again later.

Objects are handed over as plain dicts (the JSON the server sent): the plane keeps only the few fields it
uses, and the typed models of the client would cost ~10x the time and memory for 5,000 pods.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from agent.identity.backoff import Backoff

log = logging.getLogger("ambit.mgmt.kube")

PAGE_SIZE = 500
WATCH_TIMEOUT_S = (240, 300)  # the server ends each watch after this long (randomized, as client-go)
# Bookmarks arrive about once a minute: two minutes of silence is a dead connection, not a quiet cluster.
READ_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 5.0
ABSENT_RECHECK_S = 5.0  # how often a type whose CRD is not installed is looked for again
MAX_LINE_BYTES = 16 * 1024 * 1024  # one watch event; larger is a broken stream, not an object


@dataclass(frozen=True)
class ResourceType:
    """One watched collection: `/api/v1/pods`, `/apis/security.istio.io/v1/authorizationpolicies`, ..."""

    kind: str
    group_version: str  # "v1", "discovery.k8s.io/v1", "security.istio.io/v1"
    plural: str
    field_selector: str = ""  # e.g. "type=kubernetes.io/tls": the server sends nothing else

    @property
    def path(self) -> str:
        base = "/api" if "/" not in self.group_version else "/apis"
        return f"{base}/{self.group_version}/{self.plural}"

    def __str__(self) -> str:
        return f"{self.plural}.{self.group_version}"

    def query(self) -> list[tuple[str, Any]]:
        return [("fieldSelector", self.field_selector)] if self.field_selector else []


class Handler(Protocol):
    def retain(self, rtype: ResourceType, names: set[str]) -> None:
        """A list ended: `names` (object_name) are all the objects of `rtype`; forget the others."""

    def apply(self, rtype: ResourceType, event: str, obj: dict[str, Any]) -> None: ...


def object_name(obj: Mapping[str, Any]) -> str:
    """`namespace/name`, or `name` for a cluster-scoped object."""
    md = obj.get("metadata") or {}
    return f"{md.get('namespace')}/{md.get('name')}" if md.get("namespace") else str(md.get("name"))


class Gone(Exception):
    """410: the resourceVersion is no longer served; relist."""


class Absent(Exception):
    """404 on a list: the type is not served (CRD not installed)."""


class Reflector:
    """One thread keeping `handler` in step with one resource type until `stop()`."""

    def __init__(self, api_client: Any, rtype: ResourceType, handler: Handler) -> None:
        self.api = api_client
        self.rtype = rtype
        self.handler = handler
        self.synced = threading.Event()  # the first list (or "absent") has been handed over
        self.resource_version = ""
        self.counters = {
            "lists": 0,
            "relists_gone": 0,
            "relists_asked": 0,
            "watches": 0,
            "events": 0,
            "bookmarks": 0,
            "errors": 0,
        }
        self._stop = threading.Event()
        self._relist = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"kube-{rtype.plural}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.request_stop()
        self.join()

    def request_stop(self) -> None:
        """Ask the loop to end, and cut a blocked watch read short (closing the response from another
        thread does not wake a recv(); shutting the socket down does)."""
        self._stop.set()
        self._cut_watch()

    def relist(self) -> None:
        """List again as soon as possible (the handler now wants objects it dropped: a Secret a Gateway
        newly references). The current watch is cut; the list that follows hands over the whole set."""
        self._relist.set()
        self._cut_watch()

    def _cut_watch(self) -> None:
        response = self._response
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- loop ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = Backoff(initial=0.2, maximum=5.0)
        need_list = True
        while not self._stop.is_set():
            try:
                if need_list or self._relist.is_set():
                    if self._relist.is_set() and not need_list:
                        self.counters["relists_asked"] += 1
                    self._relist.clear()
                    self._list()
                    need_list = False
                    backoff.reset()
                self._watch()
                backoff.reset()
            except Gone:
                self.counters["relists_gone"] += 1
                log.info("%s: resourceVersion %s is gone, relisting", self.rtype, self.resource_version)
                need_list = True
            except Absent:
                self.handler.retain(self.rtype, set())
                self.synced.set()
                need_list = True
                self._stop.wait(ABSENT_RECHECK_S)
            except Exception as exc:
                if self._stop.is_set():
                    return
                if self._relist.is_set():
                    continue  # the watch was cut on purpose: list now, no backoff
                self.counters["errors"] += 1
                delay = backoff.next_delay()
                log.warning("%s: %s; retrying in %.1f s", self.rtype, _brief(exc), delay)
                self._stop.wait(delay)

    def _get(self, query: list[tuple[str, Any]], read_timeout: float) -> Any:
        """The raw urllib3 response (not yet read) of a GET on this type's collection."""
        from kubernetes.client.exceptions import ApiException

        method, url, headers, _, _ = self.api.param_serialize(
            "GET",
            self.rtype.path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        raw = self.api.call_api(
            method, url, header_params=headers, _request_timeout=(CONNECT_TIMEOUT_S, read_timeout)
        ).response
        if raw.status < 300:
            return raw
        body = raw.data  # small error Status; reading it frees the connection
        raw.release_conn()
        if raw.status == 410:
            raise Gone()
        if raw.status == 404:
            raise Absent()
        raise ApiException(status=raw.status, reason=f"{raw.reason}: {body[:300]!r}")

    def _list(self) -> None:
        names: set[str] = set()
        cont = ""
        while True:
            query: list[tuple[str, Any]] = [("limit", PAGE_SIZE), *self.rtype.query()]
            if cont:
                query.append(("continue", cont))
            response = self._get(query, READ_TIMEOUT_S)
            try:
                page = json.loads(response.data)
            finally:
                response.release_conn()
            for obj in page.get("items") or ():
                names.add(object_name(obj))
                self.handler.apply(self.rtype, "ADDED", obj)
            meta = page.get("metadata") or {}
            cont = meta.get("continue") or ""
            if not cont:
                self.resource_version = str(meta.get("resourceVersion") or "")
                break
        self.counters["lists"] += 1
        self.handler.retain(self.rtype, names)
        self.synced.set()

    def _watch(self) -> None:
        query = [
            *self.rtype.query(),
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", self.resource_version),
            ("timeoutSeconds", random.randint(*WATCH_TIMEOUT_S)),
        ]
        response = self._get(query, READ_TIMEOUT_S)
        self._response = response
        self.counters["watches"] += 1
        try:
            if self._relist.is_set():
                return  # asked while this watch was being opened: _cut_watch found no socket to cut
            for line in _lines(response):
                if self._stop.is_set() or self._relist.is_set():
                    return
                self._event(json.loads(line))
        finally:
            self._response = None
            response.release_conn()

    def _event(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            self.counters["bookmarks"] += 1
        elif kind in ("ADDED", "MODIFIED", "DELETED"):
            self.counters["events"] += 1
            self.handler.apply(self.rtype, kind, obj)
        if rv:
            self.resource_version = str(rv)


def _lines(response: Any) -> Iterator[bytes]:
    """Newline-delimited JSON from a chunked response, as chunks arrive (not when the stream ends)."""
    buf = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line
        if len(buf) > MAX_LINE_BYTES:
            raise RuntimeError(f"watch event larger than {MAX_LINE_BYTES} bytes")
    if buf.strip():
        yield buf


def _brief(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return f"{type(exc).__name__}: {exc}"[:300]
