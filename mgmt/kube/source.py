"""The Kubernetes config source: informers over the API server feeding the plane's ConfigStore.

One Reflector (list + watch) per type: Namespaces, Pods, Services, EndpointSlices, Nodes, ServiceCIDRs, the
policy CRDs (Istio's AuthorizationPolicy and PeerAuthentication at security.istio.io/v1, or v1beta1 where
only that is served; ambit.io/v1 RegoPolicy and MeshConfig) and the edge gateway's configuration (Gateway
API v1 GatewayClass, Gateway, HTTPRoute, v1beta1 ReferenceGrant; ambit.io/v1 WafPolicy; kubernetes.io/tls
Secrets, of which only those our Gateways' listeners may reference are kept). Gateway API status is
written from the publish thread (mgmt/kube/gateway_status). Each object is translated (mgmt/kube/translate)
into the document the file source would hold and parsed by the same code (mgmt/store.stored), so both
sources give the store, the scope and the agents identical resources.

Validity is per object, as in the file source: an invalid object is logged once per resourceVersion,
counted, reported as a Warning Event on the object and in its status (mgmt/policy_status: condition
Accepted), and skipped; if an earlier version of it was valid,
that version stays in force (a broken edit of a DENY policy keeps denying). Nothing is published before
every type has been listed once: a plane that knew the workloads but not yet the policies would hand out
an allow-everything view.

Changes are coalesced for COALESCE_S and published as one version: a burst of pod events costs one scope
rebuild, not one per pod.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from api.resources.gateway_api import Reference, permitted
from mgmt.kube import translate
from mgmt.kube.events import EventRecorder
from mgmt.kube.gateway_status import GatewayApiObjects, GatewayStatus, kept, service_addresses
from mgmt.kube.reflector import Reflector, ResourceType, object_name
from mgmt.policy_check import POLICY_KINDS, PolicyRejected, check_policy
from mgmt.policy_status import StatusWriter
from mgmt.store import ALLOWS_ONLY, ConfigError, ConfigStore, StoredResource, stored

log = logging.getLogger("ambit.mgmt.kube")

NAMESPACES = ResourceType("Namespace", "v1", "namespaces")
PODS = ResourceType("Pod", "v1", "pods")
SERVICES = ResourceType("Service", "v1", "services")
ENDPOINT_SLICES = ResourceType("EndpointSlice", "discovery.k8s.io/v1", "endpointslices")
NODES = ResourceType("Node", "v1", "nodes")
REGO_POLICIES = ResourceType("RegoPolicy", "ambit.io/v1", "regopolicies")
MESH_CONFIGS = ResourceType("MeshConfig", "ambit.io/v1", "meshconfigs")
# The mesh's Service ranges (Kubernetes >= 1.33): an address inside one whose lookup fails is refused.
SERVICE_CIDRS = ResourceType("ServiceCIDR", "networking.k8s.io/v1", "servicecidrs")
# The edge gateway's configuration (docs/gateway.md): Gateway API v1, ambit's WafPolicy, and the listener
# certificates. Secrets are watched with a field selector: the API server sends only kubernetes.io/tls
# ones (no ServiceAccount tokens, no docker configs), and of those the source keeps only the ones a
# listener of one of our Gateways references, in its own namespace or in one whose ReferenceGrant allows
# it (the others' data is dropped on arrival).
GATEWAY_API = "gateway.networking.k8s.io/v1"
GATEWAY_CLASSES = ResourceType("GatewayClass", GATEWAY_API, "gatewayclasses")
GATEWAYS = ResourceType("Gateway", GATEWAY_API, "gateways")
HTTP_ROUTES = ResourceType("HTTPRoute", GATEWAY_API, "httproutes")
WAF_POLICIES = ResourceType("WafPolicy", "ambit.io/v1", "wafpolicies")
TLS_SECRETS = ResourceType("Secret", "v1", "secrets", field_selector=f"type={translate.TLS_SECRET_TYPE}")
# Cross-namespace references (a listener's Secret, a route's backend) are followed only while one of these
# in the target's namespace allows them. v1beta1 is the stored version (v1 serves the same objects).
REFERENCE_GRANTS = ResourceType("ReferenceGrant", "gateway.networking.k8s.io/v1beta1", "referencegrants")
GATEWAY_TYPES = (GATEWAY_CLASSES, GATEWAYS, HTTP_ROUTES, WAF_POLICIES, TLS_SECRETS, REFERENCE_GRANTS)
# What a Gateway's status depends on: a change of one of these recomputes it.
GATEWAY_INPUTS = frozenset({t.kind for t in GATEWAY_TYPES} | {"Service"})
ISTIO_SECURITY = "security.istio.io"
ISTIO_KINDS = (
    ("AuthorizationPolicy", "authorizationpolicies"),
    ("PeerAuthentication", "peerauthentications"),
)
COALESCE_S = 0.02
SECRET_RELIST_WAIT_S = 5.0  # longest a publish waits for a Secrets relist (an API server that is down)
SYNC_LOG_EVERY_S = 10.0

Translator = Callable[[Mapping[str, Any]], "dict[str, Any] | None"]


def istio_version(api_client: Any) -> str:
    """security.istio.io/v1 when served (Istio >= 1.22), else v1beta1. Both versions are views of the same
    stored objects: watching both would see every policy twice."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        groups = client.ApisApi(api_client).get_api_versions().groups
    except ApiException:
        return "v1"
    for g in groups or ():
        if g.name == ISTIO_SECURITY:
            served = {v.version for v in g.versions or ()}
            return "v1" if "v1" in served or not served else "v1beta1"
    return "v1"  # not installed yet: watched as absent until the CRDs appear


def watched_types(api_client: Any) -> list[ResourceType]:
    version = istio_version(api_client)
    istio = [ResourceType(kind, f"{ISTIO_SECURITY}/{version}", plural) for kind, plural in ISTIO_KINDS]
    return [
        NAMESPACES,
        PODS,
        SERVICES,
        ENDPOINT_SLICES,
        NODES,
        SERVICE_CIDRS,
        *istio,
        REGO_POLICIES,
        MESH_CONFIGS,
        *GATEWAY_TYPES,
    ]


@dataclass
class _Invalid:
    error: ConfigError
    resource_version: str


class KubeSource:
    """Keeps `store` equal to what the API server holds; `start()`, `wait_synced()`, `stop()`."""

    def __init__(self, api_client: Any, store: ConfigStore, events: bool = True) -> None:
        self.api = api_client
        self.store = store
        self._lock = threading.Lock()
        self._resources: dict[str, StoredResource] = {}  # by str(ResourceKey), what is published
        self._invalid: dict[str, _Invalid] = {}  # by "Kind ns/name" of the Kubernetes object
        self._names: dict[str, set[str]] = {}  # rtype kind -> "ns/name" of the objects it holds
        self._services: dict[str, Mapping[str, Any]] = {}  # "ns/name" -> Service object
        self._slices: dict[str, dict[str, dict[str, int]]] = {}  # "ns/service" -> slice name -> ports
        self._slice_service: dict[str, str] = {}  # "ns/slice" -> "ns/service"
        self._gw = GatewayApiObjects()  # Gateway API objects as the API server has them (status included)
        self._secret_refs: set[str] = set()  # "ns/name" of the Secrets our Gateways' listeners reference
        self._secrets_dropped: set[str] = set()  # TLS Secrets seen but not kept (no listener refers to them)
        self._foreign_refs: set[str] = set()  # listener references to another namespace's Secret, ungranted
        self._waf_refused: dict[str, str] = {}  # WafPolicy "ns/name" -> why it is refused (publish thread)
        self._gateway_dirty = False
        self._secrets_relist_since: float | None = None  # monotonic time a relist of the Secrets was asked
        self._gateway_status = GatewayStatus()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._events = EventRecorder(api_client) if events else None
        self._status = StatusWriter(api_client) if events else None
        self._counters = {
            "invalid_objects": 0,
            "rejected_objects": 0,
            "publishes": 0,
            "secret_relists": 0,
            "secret_refs_refused": 0,
        }
        self.last_publish_at = 0.0  # monotonic time of the last publish (bench: event-to-version latency)
        self.reflectors = [Reflector(api_client, t, self) for t in watched_types(api_client)]
        self._translators: dict[str, Translator] = {
            "Namespace": translate.namespace,
            "Pod": translate.workload,
            "Node": translate.node,
            "ServiceCIDR": translate.service_cidr,
        }
        self._publisher = threading.Thread(target=self._publish_loop, name="kube-publish", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._events is not None:
            self._events.start()
        if self._status is not None:
            self._status.start()
        for r in self.reflectors:
            r.start()
        self._publisher.start()

    def synced(self) -> bool:
        return all(r.synced.is_set() for r in self.reflectors)

    def wait_synced(self, timeout: float) -> bool:
        """True once every type was listed and that state published (the store holds it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.synced() and self._counters["publishes"] and not self._dirty.is_set():
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        for r in self.reflectors:
            r.request_stop()
        for r in self.reflectors:
            r.join()
        self._publisher.join(timeout=5)
        if self._events is not None:
            self._events.stop()
        if self._status is not None:
            self._status.stop()

    def counters(self) -> dict[str, int]:
        out = dict(self._counters)
        for r in self.reflectors:
            for k, v in r.counters.items():
                out[f"{r.rtype.plural}_{k}"] = v
        if self._events is not None:
            out.update(self._events.counters)
        if self._status is not None:
            out.update(self._status.counters)
        return out

    def invalid(self) -> list[ConfigError]:
        with self._lock:
            return [i.error for i in self._invalid.values()]

    # -- Reflector handler -----------------------------------------------------------------------------
    def retain(self, rtype: ResourceType, names: set[str]) -> None:
        with self._lock:
            for gone in self._names.get(rtype.kind, set()) - names:
                self._delete(rtype, gone)
            if rtype.kind == "Secret":
                self._secrets_relist_since = None  # the relist, if one was asked, has handed everything over
        self._dirty.set()

    def apply(self, rtype: ResourceType, event: str, obj: dict[str, Any]) -> None:
        with self._lock:
            if event == "DELETED":
                self._delete(rtype, object_name(obj))
            else:
                self._upsert(rtype, obj)
        self._dirty.set()

    # -- state (under the lock) ------------------------------------------------------------------------
    def _upsert(self, rtype: ResourceType, obj: Mapping[str, Any]) -> None:
        name = object_name(obj)
        self._names.setdefault(rtype.kind, set()).add(name)
        if rtype.kind == "Service":
            self._gateway_dirty = True  # a route's backends may have appeared or gone
            self._gw.services[name] = service_addresses(obj)
            self._services[name] = _slim(obj)
            self._set_service(name)
        elif rtype.kind == "EndpointSlice":
            owner = self._slice_owner(obj)
            previous = self._slice_service.get(name)
            if previous is not None and previous != owner:
                self._delete(rtype, name)  # relabelled to another Service
            self._slice_service[name] = owner
            self._slices.setdefault(owner, {})[name] = translate.slice_ports(obj)
            self._set_service(owner)
        elif rtype.kind in GATEWAY_INPUTS and rtype.kind != "Service":
            self._upsert_gateway_api(rtype.kind, name, obj)
        else:
            translator = self._translators.get(rtype.kind, translate.policy)
            self._set(rtype.kind, name, translator(obj), obj)

    def _delete(self, rtype: ResourceType, name: str) -> None:
        self._names.get(rtype.kind, set()).discard(name)
        if rtype.kind == "EndpointSlice":
            owner = self._slice_service.pop(name, None)
            slices = self._slices.get(owner or "", {})
            if owner is not None and slices.pop(name, None) is not None:
                if not slices:
                    del self._slices[owner]
                self._set_service(owner)
            return
        if rtype.kind == "Service":
            self._services.pop(name, None)
            self._gw.services.pop(name, None)
        if rtype.kind in GATEWAY_INPUTS:
            self._gateway_dirty = True
        if rtype.kind in ("GatewayClass", "Gateway", "HTTPRoute", "WafPolicy", "ReferenceGrant"):
            self._delete_gateway_api(rtype.kind, name)
            return
        if rtype.kind == "Secret":
            self._secrets_dropped.discard(name)
        self._set(rtype.kind, name, None, None)

    # -- Gateway API (under the lock) ------------------------------------------------------------------
    def _raw_bucket(self, kind: str) -> dict[str, Mapping[str, Any]]:
        return {
            "GatewayClass": self._gw.classes,
            "Gateway": self._gw.gateways,
            "HTTPRoute": self._gw.routes,
            "WafPolicy": self._gw.waf_policies,
        }[kind]

    def _upsert_gateway_api(self, kind: str, name: str, obj: Mapping[str, Any]) -> None:
        self._gateway_dirty = True
        if kind == "Secret":
            self._set_secret(name, obj)
            return
        if kind == "ReferenceGrant":  # no status of its own; which Secrets may be held may have changed
            self._set(kind, name, translate.policy(obj), obj)
            if kind in ALLOWS_ONLY and f"{kind} {name}" in self._invalid:
                # A grant allows: unlike a policy, a broken edit revokes it rather than keep its last version.
                self._resources.pop(_resource_key(kind, name), None)
            self._refresh_secret_refs()
            return
        self._raw_bucket(kind)[name] = kept(obj)
        if kind == "GatewayClass":  # which Gateways are ours may have changed
            for gw in list(self._gw.gateways):
                self._set_gateway(gw)
        elif kind == "Gateway":
            self._set_gateway(name)
        else:
            self._set(kind, name, translate.policy(obj), obj)

    def _delete_gateway_api(self, kind: str, name: str) -> None:
        if kind == "ReferenceGrant":  # a revoked grant: the Secret it allowed is dropped at once
            self._set(kind, name, None, None)
            self._refresh_secret_refs()
            return
        self._raw_bucket(kind).pop(name, None)
        if kind == "GatewayClass":
            for gw in list(self._gw.gateways):
                self._set_gateway(gw)
            return
        self._set(kind, name, None, None)
        if kind == "Gateway":
            self._refresh_secret_refs()

    def _set_gateway(self, name: str) -> None:
        """A Gateway is held only while its class is ours: another controller's Gateway is not config."""
        raw = self._gw.gateways.get(name)
        doc = translate.policy(raw) if raw is not None and self._gw.ours(raw) else None
        self._set("Gateway", name, doc, raw)
        self._refresh_secret_refs()

    def _set_secret(self, name: str, obj: Mapping[str, Any]) -> None:
        if name in self._secret_refs:
            self._secrets_dropped.discard(name)
            self._set("Secret", name, translate.tls_secret(obj), obj)
        else:
            self._secrets_dropped.add(name)
            self._set("Secret", name, None, None)

    def _refresh_secret_refs(self) -> None:
        """Which Secrets the held Gateways may reference (in their own namespace, or in one whose held
        ReferenceGrant allows it). One newly referenced that was seen and dropped is read again by a
        relist of the Secrets; one no longer referenced (or no longer granted) is forgotten."""
        refs: set[str] = set()
        foreign: set[str] = set()
        grants = [r.obj for r in self._resources.values() if r.kind == "ReferenceGrant"]
        for res in self._resources.values():
            if res.kind != "Gateway":
                continue
            for ref in (r for lst in res.obj.listeners for r in lst.certificate_refs if r.kind == "Secret"):
                cross = Reference("Gateway", res.obj.meta.namespace, "Secret", ref.namespace, ref.name)
                if permitted(grants, cross):
                    refs.add(f"{ref.namespace}/{ref.name}")
                else:
                    foreign.add(
                        f"Gateway {res.key.namespace}/{res.key.name} -> Secret {ref.namespace}/{ref.name}"
                    )
        for refused in foreign - self._foreign_refs:  # once per reference, not per event
            self._counters["secret_refs_refused"] += 1
            log.warning("kube: %s not held: no ReferenceGrant in its namespace allows it", refused)
        self._foreign_refs = foreign
        if refs == self._secret_refs:
            return
        gone, wanted = self._secret_refs - refs, refs - self._secret_refs
        self._secret_refs = refs
        for name in gone:
            if f"Secret/{name}" in self._resources:
                self._secrets_dropped.add(name)
            self._set("Secret", name, None, None)
        if wanted & self._secrets_dropped:
            self._counters["secret_relists"] += 1
            if self._secrets_relist_since is None:
                self._secrets_relist_since = time.monotonic()
            for r in self.reflectors:
                if r.rtype.kind == "Secret":
                    r.relist()

    @staticmethod
    def _slice_owner(obj: Mapping[str, Any]) -> str:
        md = obj.get("metadata") or {}
        return f"{md.get('namespace')}/{(md.get('labels') or {}).get(translate.SERVICE_NAME_LABEL, '')}"

    def _set_service(self, name: str) -> None:
        svc = self._services.get(name)
        doc = translate.service(svc, self._slices.get(name, {}).values()) if svc is not None else None
        self._set("Service", name, doc, svc)

    def _set(self, kind: str, name: str, doc: dict[str, Any] | None, obj: Mapping[str, Any] | None) -> None:
        """The derived document of one Kubernetes object (None: not, or no longer, part of the mesh)."""
        source = f"{kind} {name}"
        key = _resource_key(kind, name)
        if doc is None:
            self._resources.pop(key, None)
            self._invalid.pop(source, None)
            return
        res = stored(doc, source)
        if kind in POLICY_KINDS:
            res = self._checked_policy(res, doc, source, obj or {})
        if isinstance(res, ConfigError):
            self._reject(source, res, obj or {})
            return  # a last good version of `key`, if any, stays in _resources
        self._invalid.pop(source, None)
        self._resources[key] = res

    def _checked_policy(
        self, res: StoredResource | ConfigError, doc: dict[str, Any], source: str, obj: Mapping[str, Any]
    ) -> StoredResource | ConfigError:
        """A policy that parses but would not compile on the agents (a Rego module that does not build,
        ...) is skipped like one that does not parse: otherwise every agent would NACK the whole version.
        The verdict goes into the object's status either way."""
        if not isinstance(res, ConfigError):
            try:
                check_policy(doc, self.store.trust_domain)
            except PolicyRejected as exc:
                res = ConfigError(source, str(exc), str(res.key))
        if self._status is not None:
            self._status.report(obj, res.reason if isinstance(res, ConfigError) else None)
        return res

    def _reject(self, source: str, error: ConfigError, obj: Mapping[str, Any]) -> None:
        rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
        seen = self._invalid.get(source)
        self._invalid[source] = _Invalid(error, rv)
        if seen is not None and seen.resource_version == rv:
            return  # a relist of the same object: reported already
        self._counters["rejected_objects"] += 1
        kept = " (its last valid version stays in force)" if error.key in self._resources else ""
        log.error("kube: skipped invalid %s: %s%s", source, error.reason, kept)
        if self._events is not None:
            self._events.invalid(obj, error.reason)

    # -- publishing ------------------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        last_waiting_log = time.monotonic()
        while not self._stop.is_set():
            if not self._dirty.wait(0.5):
                continue
            if not self.synced():
                if time.monotonic() - last_waiting_log > SYNC_LOG_EVERY_S:
                    waiting = ", ".join(str(r.rtype) for r in self.reflectors if not r.synced.is_set())
                    log.warning("kube: not publishing until every type is listed; waiting for %s", waiting)
                    last_waiting_log = time.monotonic()
                time.sleep(0.05)
                continue
            time.sleep(COALESCE_S)  # let the rest of a burst arrive
            with self._lock:
                since = self._secrets_relist_since
                if since is not None and time.monotonic() - since < SECRET_RELIST_WAIT_S:
                    # A Gateway now references a Secret being read again: publishing first would hand
                    # the gateway a listener without its certificate (it would refuse that version).
                    continue
                self._dirty.clear()
                resources = dict(self._resources)
                errors = [i.error for i in self._invalid.values()]
                self._counters["invalid_objects"] = len(errors)
                gateway_dirty, self._gateway_dirty = self._gateway_dirty, False
                raw = self._gw.copy() if gateway_dirty else None
                invalid = {source: i.error.reason for source, i in self._invalid.items()}
            self.store.publish(resources, errors)
            self._counters["publishes"] += 1
            self.last_publish_at = time.monotonic()
            if raw is not None:
                self._write_gateway_status(raw, resources, invalid)

    def _write_gateway_status(
        self, raw: GatewayApiObjects, resources: dict[str, StoredResource], invalid: dict[str, str]
    ) -> None:
        if self._status is None:
            return
        try:
            for write in self._gateway_status.writes(raw, resources, invalid):
                self._status.submit(*write)
            verdicts = self._gateway_status.waf_verdicts(raw, resources, invalid)
            refused: dict[str, str] = {}
            for obj, problem in verdicts:
                self._status.report(obj, problem)
                name = object_name(obj)
                if problem is not None:
                    refused[name] = problem
                    if self._waf_refused.get(name) != problem and f"WafPolicy {name}" not in invalid:
                        log.warning("kube: WafPolicy %s: the gateway would refuse it: %s", name, problem)
            self._waf_refused = refused  # logged once per verdict (the parser's are logged by _reject)
            self._counters["waf_policies_refused"] = len(refused)
            self._counters["gateway_status_runs"] = self._counters.get("gateway_status_runs", 0) + 1
        except Exception:  # a status bug must not stop publishing
            self._counters["status_failures"] = self._counters.get("status_failures", 0) + 1
            log.exception("kube: computing Gateway API status")


def _slim(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What is kept of an object between events: its spec and identity (no managedFields, no status)."""
    md = obj.get("metadata") or {}
    keep = ("name", "namespace", "labels", "uid", "resourceVersion")
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {k: md[k] for k in keep if k in md},
        "spec": obj.get("spec") or {},
    }


def _resource_key(kind: str, name: str) -> str:
    """str(ResourceKey) of the document an object becomes (a Pod becomes a Workload of the same name)."""
    return f"{'Workload' if kind == 'Pod' else kind}/{name}"
