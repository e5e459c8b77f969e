from agent import enrolment
from agent.redirect.maps import PodEntry
from api.resources import Meta
from api.resources.workload import Namespace, Workload

AMBIENT_NS = Namespace(Meta("shop", labels={"ambit.io/dataplane-mode": "ambient"}))
PLAIN_NS = Namespace(Meta("legacy"))


def wl(name: str, ns: str, ips: tuple[str, ...], labels: dict[str, str] | None = None) -> Workload:
    return Workload(Meta(name, ns, labels or {}), "sa", "node-1", ips)


def namespaces(w: Workload) -> Namespace | None:
    return {"shop": AMBIENT_NS, "legacy": PLAIN_NS}.get(w.namespace)


def test_desired_follows_namespace_and_workload_labels() -> None:
    local = [
        wl("a", "shop", ("10.0.0.1", "10.0.0.2")),
        wl("b", "legacy", ("10.0.0.3",)),
        wl("c", "legacy", ("10.0.0.4",), {"ambit.io/dataplane-mode": "ambient"}),
        wl("d", "shop", ("10.0.0.5",), {"ambit.io/dataplane-mode": "none"}),
        wl("e", "nowhere", ("10.0.0.6",)),
    ]
    got = enrolment.desired(
        local, lambda w: w.enrolled(namespaces(w)), lambda w: "STRICT" if w.name == "a" else "PERMISSIVE"
    )
    assert got == {
        "10.0.0.1": PodEntry("shop/a", True),
        "10.0.0.2": PodEntry("shop/a", True),
        "10.0.0.4": PodEntry("legacy/c", False),
    }
