import pytest

from agent.proxy.telemetry import (
    BAGGAGE_MAX,
    MAX_MEMBERS,
    TelemetryError,
    baggage,
    new_traceparent,
    parse_baggage,
    source_workload,
    trace_id,
)
from api.resources import Meta
from api.resources.workload import Workload
from api.spiffe import SpiffeId

PEER = SpiffeId.workload("cluster.local", "shop", "web")


def _workload(name: str = "web-7d9f", labels: dict[str, str] | None = None) -> Workload:
    return Workload(Meta(name=name, namespace="shop", labels=labels or {}), "web", "node-1", ("10.244.1.2",))


def test_baggage_names_the_source_as_ztunnel_does() -> None:
    labels = {"app": "web", "version": "v2"}
    assert baggage(_workload(labels=labels), "c1") == (
        "k8s.cluster.name=c1,k8s.namespace.name=shop,k8s.pod.name=web-7d9f,service.name=web,service.version=v2"
    )
    # Istio's canonical labels win over app/version; without any, the name and "latest"
    canonical = {
        "app": "x",
        "service.istio.io/canonical-name": "store",
        "service.istio.io/canonical-revision": "r9",
    }
    assert baggage(_workload(labels=canonical)).endswith("service.name=store,service.version=r9")
    assert baggage(_workload()).endswith("service.name=web-7d9f,service.version=latest")


def test_baggage_round_trips_and_fits_the_engine_bound() -> None:
    fields = parse_baggage(baggage(_workload(labels={"app": "a b,c=d"})))
    assert fields["service.name"] == "a b,c=d"  # percent-encoded on the wire, decoded back
    assert source_workload(fields, PEER) == "shop/web-7d9f"
    long = baggage(_workload(labels={"app": "x" * 300, "version": "y" * 300}))
    assert len(long) <= BAGGAGE_MAX and "k8s.pod.name=web-7d9f" in long


@pytest.mark.parametrize(
    "text",
    [
        "a",  # no =
        "a=1,a=2",  # repeated
        "a=1;prop=x",  # properties: ztunnel sends none
        'a="quoted"',
        "a=%ff%fe",  # not UTF-8
        "k e y=1",
        ",".join(f"k{i}=v" for i in range(MAX_MEMBERS + 1)),
        "a=" + "b" * 300,
    ],
)
def test_hostile_baggage_is_an_error(text: str) -> None:
    with pytest.raises(TelemetryError):
        parse_baggage(text)


@pytest.mark.parametrize(
    "fields,expect",
    [
        ({"k8s.namespace.name": "shop", "k8s.deployment.name": "web"}, "shop/web"),
        ({"k8s.namespace.name": "bank", "k8s.deployment.name": "vault"}, ""),  # not the peer's namespace
        ({"k8s.namespace.name": "shop"}, ""),
        ({"k8s.namespace.name": "shop", "k8s.pod.name": "a", "k8s.deployment.name": "b"}, ""),  # ambiguous
        ({"k8s.namespace.name": "shop", "k8s.deployment.name": "Not/A-Name"}, ""),
        ({"k8s.namespace.name": "shop", "k8s.secret.name": "x"}, ""),  # not a workload kind
    ],
)
def test_baggage_names_a_source_only_in_the_peers_namespace(fields: dict[str, str], expect: str) -> None:
    assert source_workload(fields, PEER) == expect


def test_traceparent_is_fresh_w3c_and_its_trace_id_is_read_strictly() -> None:
    a, b = new_traceparent(), new_traceparent()
    assert a != b and len(a) == 55 and a.startswith("00-") and a.endswith("-00")
    assert trace_id(a) == a[3:35]
    for bad in ("", "01-" + a[3:], a.upper(), a + "x", "00-" + "0" * 32 + a[35:], a[:36] + "0" * 16 + a[52:]):
        assert trace_id(bad) == ""
