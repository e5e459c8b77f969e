"""Relay: 1,000 workloads on 10 simulated nodes; per-node views computed and delivered over real mTLS gRPC.

Baselines in the same run: computing + serializing the FULL (unscoped) view for every node, i.e. what a plane
without node scoping would do, and its size. Delivery is 10 real RelayClients on loopback.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from mgmt.ca import CertificateAuthority
from mgmt.relay_service import delta_response
from mgmt.scope import ScopeIndex
from mgmt.store import ConfigStore
from tests.relay_fixtures import TD, Recorder, relay_client, start_plane, workload_doc, write_docs

NODES = 10
WORKLOADS = 1000
NAMESPACES = 10
REPEAT = 5
DELIVERY_TIMEOUT = 30.0


def _write_config(config: Path) -> None:
    config.mkdir(parents=True)
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "ambit.io/v1",
            "kind": "Node",
            "metadata": {"name": f"node-{n}"},
            "spec": {"addresses": [f"172.30.0.{n}"]},
        }
        for n in range(1, NODES + 1)
    ]
    for i in range(NAMESPACES):
        ns = f"ns-{i}"
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": ns, "labels": {"ambit.io/dataplane-mode": "ambient"}},
            }
        )
        docs.append(
            {
                "apiVersion": "ambit.io/v1",
                "kind": "Service",
                "metadata": {"name": "app", "namespace": ns},
                "spec": {
                    "addresses": [f"10.96.0.{i + 1}"],
                    "ports": [{"port": 80, "targetPort": 8080}],
                    "selector": {"app": f"app-{i}"},
                },
            }
        )
        docs.append(
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "allow-ns", "namespace": ns},
                "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": [ns]}}]}]},
            }
        )
    write_docs(config / "cluster.yaml", docs)
    for n in range(1, NODES + 1):
        per_node = WORKLOADS // NODES
        write_docs(
            config / f"node-{n}.yaml",
            [
                workload_doc(
                    f"app-{j % NAMESPACES}-{n}x{j}",
                    n,
                    f"10.{n}.{j // 250}.{j % 250 + 1}",
                    namespace=f"ns-{j % NAMESPACES}",
                )
                for j in range(per_node)
            ],
        )


def _best(fn: Any) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(REPEAT):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config, state = Path(tmp) / "config", Path(tmp) / "state"
        _write_config(config)
        store = ConfigStore(config, state, trust_domain=TD)
        t = time.perf_counter()
        assert store.load() == []
        rows.append(_row("store_load_1000_workloads", time.perf_counter() - t, "ms"))
        snapshot = store.current
        nodes = [f"node-{n}" for n in range(1, NODES + 1)]

        def full() -> int:
            index = ScopeIndex(snapshot)
            return sum(len(delta_response(index.full_view().values(), ()).SerializeToString()) for _ in nodes)

        def scoped() -> int:
            index = ScopeIndex(snapshot)
            return sum(len(delta_response(index.view(n).values(), ()).SerializeToString()) for n in nodes)

        full_s, full_bytes = _best(full)
        scoped_s, scoped_bytes = _best(scoped)
        rows.append(_row("views_full_10_nodes", full_s, "ms"))
        rows.append(_row("views_scoped_10_nodes", scoped_s, "ms", "views_full_10_nodes"))
        rows.append({"name": "bytes_full_per_node", "value": full_bytes / NODES, "unit": "B", "baseline": ""})
        rows.append(
            {
                "name": "bytes_scoped_per_node",
                "value": scoped_bytes / NODES,
                "unit": "B",
                "baseline": "bytes_full_per_node",
            }
        )
        rows.extend(_delivery(config, Path(tmp) / "plane-state", nodes))
    return rows


def _delivery(config: Path, state: Path, nodes: list[str]) -> list[dict[str, Any]]:
    ca = CertificateAuthority.generate_root(TD)
    plane = start_plane(config, state, ca)
    plane.store.stop()  # the bench drives reloads itself, so the 200 ms poll is not measured
    try:
        contexts = [relay_client(plane.target, ca, n) for n in nodes]
        t = time.perf_counter()
        clients = [c.__enter__() for c in contexts]
        version = plane.store.version
        _wait_all([rec for _, rec in clients], lambda s: s.version == version)
        initial = time.perf_counter() - t
        write_docs(config / "extra.yaml", [workload_doc("late-1", 1, "10.1.9.9", namespace="ns-1")])
        t = time.perf_counter()
        plane.store.load()
        _wait_all([rec for _, rec in clients], lambda s: s.version == version + 1)
        change = time.perf_counter() - t
        for ctx in contexts:
            ctx.__exit__(None, None, None)
        return [
            _row("deliver_initial_views_10_nodes_mtls", initial, "ms"),
            _row("deliver_one_change_10_nodes", change, "ms", "deliver_initial_views_10_nodes_mtls"),
        ]
    finally:
        plane.stop()


def _wait_all(recorders: list[Recorder], pred: Any) -> None:
    for rec in recorders:
        if rec.wait_for(pred, DELIVERY_TIMEOUT) is None:
            raise RuntimeError("a node did not receive its view in time")


def _row(name: str, seconds: float, unit: str, baseline: str = "") -> dict[str, Any]:
    return {"name": name, "value": seconds * 1000, "unit": unit, "baseline": baseline}
