"""The telemetry context HBONE carries, as ztunnel sends it: W3C `baggage` naming the source workload and a
W3C `traceparent` per connection.

Outbound, every CONNECT gets `baggage: k8s.cluster.name=<cluster>,k8s.namespace.name=<ns>,
k8s.<kind>.name=<name>,service.name=<canonical name>,service.version=<canonical revision>` and a fresh
`traceparent` (version 00, random trace and parent ids, flags 00), whose trace id both sides record so their
records join. Inbound, the peer's baggage is its word: parsed strictly (bounded, no properties, each key
once) and used only to name a source workload the mesh view does not know, and only within the namespace
of the peer's authenticated identity (a peer cannot name another namespace's workload as the source).
"""

from __future__ import annotations

import re
import secrets
import urllib.parse
from collections.abc import Mapping

from api.resources.workload import Workload
from api.spiffe import SpiffeId

DEFAULT_CLUSTER = "Kubernetes"  # Istio's default cluster ID
MAX_MEMBERS = 16
BAGGAGE_MAX = 511  # the engine reports a peer's baggage up to 511 bytes (ambit_event.baggage); sent within it
# Istio's canonical service name and revision labels, then the Kubernetes recommended ones, then `app`.
_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_VERSION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
_KEY = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")  # RFC 7230 token, bounded
_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]{0,253}")  # W3C baggage-octet, bounded
_KIND_KEY = re.compile(r"k8s\.(pod|deployment|replicaset|statefulset|daemonset|job|cronjob)\.name")
_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")


class TelemetryError(ValueError):
    pass


def _label(labels: Mapping[str, str], keys: tuple[str, ...], default: str) -> str:
    return next((labels[k] for k in keys if labels.get(k)), default)


def baggage(workload: Workload, cluster: str = DEFAULT_CLUSTER) -> str:
    """The baggage ztunnel sends for `workload` as the source (values percent-encoded where needed)."""
    labels = workload.labels
    members = (
        ("k8s.cluster.name", cluster),
        ("k8s.namespace.name", workload.namespace),
        ("k8s.pod.name", workload.name),  # ambit's workloads are pods; ztunnel names the owner's kind
        ("service.name", _label(labels, _NAME_LABELS, workload.name)),
        ("service.version", _label(labels, _VERSION_LABELS, "latest")),
    )
    encoded = [f"{k}={urllib.parse.quote(v, safe='')}" for k, v in members]
    # The engine bounds the header: long names lose the trailing members rather than the stream.
    while len(",".join(encoded)) > BAGGAGE_MAX:
        encoded.pop()
    return ",".join(encoded)


def new_traceparent() -> str:
    """A fresh W3C traceparent for one outbound connection: random non-zero ids, not sampled (as ztunnel)."""
    trace_id = secrets.randbits(128) or 1
    parent_id = secrets.randbits(64) or 1
    return f"00-{trace_id:032x}-{parent_id:016x}-00"


def trace_id(traceparent: str) -> str:
    """The trace id of a well-formed version-00 traceparent with non-zero ids, else ""."""
    m = _TRACEPARENT.fullmatch(traceparent)
    if m is None or not int(m.group(1), 16) or not int(m.group(2), 16):
        return ""
    return m.group(1)


def parse_baggage(text: str) -> dict[str, str]:
    """W3C baggage as {key: decoded value}; "" gives {}. Strict: at most MAX_MEMBERS members, each
    `key=value` with a token key and baggage-octet value (no properties), each key once."""
    if not text:
        return {}
    members = text.split(",")
    if len(members) > MAX_MEMBERS:
        raise TelemetryError(f"baggage has {len(members)} members (at most {MAX_MEMBERS})")
    out: dict[str, str] = {}
    for member in members:
        key, sep, value = member.strip(" \t").partition("=")
        key, value = key.strip(" \t"), value.strip(" \t")
        if not sep or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value):
            raise TelemetryError(f"baggage member {member[:80]!r} is not key=value")
        if key in out:
            raise TelemetryError(f"baggage repeats {key!r}")
        try:
            out[key] = urllib.parse.unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise TelemetryError(f"baggage value of {key!r} is not percent-encoded UTF-8") from None
    return out


def source_workload(fields: Mapping[str, str], peer: SpiffeId) -> str:
    """ "<ns>/<name>" of the source workload the baggage names, or "" when it names none or one outside the
    namespace of the authenticated `peer`."""
    names = [v for k, v in fields.items() if _KIND_KEY.fullmatch(k)]
    namespace = fields.get("k8s.namespace.name", "")
    if len(names) != 1 or not _DNS_NAME.fullmatch(names[0]) or not _DNS_NAME.fullmatch(namespace):
        return ""
    if peer.namespace != namespace:
        return ""
    return f"{namespace}/{names[0]}"
