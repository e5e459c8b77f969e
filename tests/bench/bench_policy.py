"""Policy decisions per second: compiled AuthorizationPolicies, and a RegoPolicy with and without the cache.

Baseline = Rego uncached (every connection a new attribute tuple), so ratios read as speedups. The policy
set is 20 AuthorizationPolicies across three workloads (DENY on IP blocks and namespaces, ALLOW on
principals, ports and `when` conditions); connections cycle through 64 attribute tuples.
"""

from __future__ import annotations

import time
from typing import Any

from agent.policy.decision import ConnectionAttrs
from agent.policy.engine import PolicyEngine
from agent.state import MeshSnapshot
from api.resources import load_kinds, parse
from api.spiffe import SpiffeId

PHASE_S = 4.0
TD = "cluster.local"
REGO = """
package ambit
import rego.v1
default authz := {"allow": false, "reason": "not allowed"}
authz := {"allow": true, "reason": "frontend"} if {
    input.source_namespace == "front"
    input.destination_port in {80, 443}
}
"""


def _doc(kind: str, ns: str, name: str, spec: dict[str, Any], api: str = "security.istio.io/v1") -> Any:
    metadata = {"name": name, "namespace": ns, "labels": spec.pop("_labels", {})}
    return parse({"apiVersion": api, "kind": kind, "metadata": metadata, "spec": spec}, "bench")


def _mesh(with_rego: bool) -> MeshSnapshot:
    objects = [
        _doc(
            "Workload",
            "shop",
            app,
            {"_labels": {"app": app}, "node": "n1", "ips": [f"10.244.1.{i}"]},
            "ambit.io/v1",
        )
        for i, app in enumerate(("web", "db", "cache"), start=2)
    ]
    for i in range(20):
        app = ("web", "db", "cache")[i % 3]
        spec: dict[str, Any]
        if i % 4 == 0:
            spec = {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": [f"192.168.{i}.0/24"]}}]}]}
        elif i % 4 == 1:
            spec = {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": [f"evil{i}"]}}]}]}
        elif i % 4 == 2:
            spec = {
                "rules": [
                    {
                        "from": [
                            {"source": {"principals": [f"{TD}/ns/front/sa/client{i}", f"{TD}/ns/ops/*"]}}
                        ],
                        "to": [{"operation": {"ports": ["80", "443"]}}],
                    }
                ]
            }
        else:
            spec = {"rules": [{"when": [{"key": "source.namespace", "values": ["front"]}]}]}
        spec["selector"] = {"matchLabels": {"app": app}}
        objects.append(_doc("AuthorizationPolicy", "shop", f"p{i}", spec))
    if with_rego:
        objects.append(_doc("RegoPolicy", "shop", "rego", {"module": REGO}, "ambit.io/v1"))
    return MeshSnapshot.from_objects(1, TD, "n1", objects)


def _attrs(i: int, unique_ip: bool = False) -> ConnectionAttrs:
    ns = ("front", "ops", "back", "evil1")[i % 4]
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" if unique_ip else f"10.0.0.{i % 64}"
    app = ("web", "db", "cache")[i % 3]
    return ConnectionAttrs(
        source_principal=SpiffeId.parse(f"spiffe://{TD}/ns/{ns}/sa/client{i % 7}"),
        source_ip=ip,
        destination_ip="10.244.1.2",
        destination_port=(80, 443, 8080)[i % 3],
        destination_workload=f"shop/{app}",
        destination_namespace="shop",
    )


def _rate(engine: PolicyEngine, pool: list[ConnectionAttrs], repeat: bool = True) -> float:
    """Decisions per second over PHASE_S, cycling through `pool` (or going through it once at most)."""
    authorize = engine.authorize
    n = 0
    start = time.perf_counter()
    deadline = start + PHASE_S
    while True:
        for i in range(0, len(pool), 64):
            for a in pool[i : i + 64]:
                authorize(a)
            n += len(pool[i : i + 64])
            now = time.perf_counter()
            if now >= deadline or (not repeat and n >= len(pool)):
                return n / (now - start)


def run() -> list[dict[str, Any]]:
    load_kinds()
    compiled = PolicyEngine(TD)
    compiled.update(_mesh(with_rego=False))
    with_rego = PolicyEngine(TD)
    with_rego.update(_mesh(with_rego=True))
    pool = [_attrs(i) for i in range(64)]

    # Every connection a new attribute tuple: each decision evaluates the Rego module.
    uncached = _rate(with_rego, [_attrs(i, unique_ip=True) for i in range(60000)], repeat=False)
    assert with_rego.counters()["rego_cache_hits"] == 0, "uncached phase must not hit the cache"
    cached = _rate(with_rego, pool)
    fast = _rate(compiled, pool)

    live = [_attrs(i) for i in range(10000)]
    start = time.perf_counter()
    denied = sum(compiled.denies(a) for a in live)
    recheck_ms = (time.perf_counter() - start) * 1000

    base = "rego uncached"
    rows: list[dict[str, Any]] = [
        {"name": base, "value": uncached, "unit": "decisions/s", "baseline": ""},
        {"name": "rego cached", "value": cached, "unit": "decisions/s", "baseline": base},
        {"name": "compiled (20 policies)", "value": fast, "unit": "decisions/s", "baseline": base},
        {
            "name": f"recheck 10k live connections ({denied} denied)",
            "value": recheck_ms,
            "unit": "ms",
            "baseline": "",
        },
    ]
    return rows
