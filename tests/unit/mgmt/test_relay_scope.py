"""Per-node views: own workloads in full, peers only on lookup and in minimal form, policies by namespace."""

from __future__ import annotations

import json
from pathlib import Path

from mgmt.scope import ScopeIndex
from mgmt.store import ConfigStore
from tests.relay_fixtures import workload_doc, write_docs, write_mesh


def _index(tmp_path: Path) -> ScopeIndex:
    write_mesh(tmp_path / "config", nodes=3)
    store = ConfigStore(tmp_path / "config")
    assert store.load() == []
    return ScopeIndex(store.current)


def test_node_view_holds_own_workloads_and_what_they_depend_on(tmp_path: Path) -> None:
    view = _index(tmp_path).view("node-1")
    workloads = sorted(k for k in view if k.startswith("Workload/"))
    assert workloads == ["Workload/demo/web-11", "Workload/demo/web-12"]
    assert {"Node/node-1", "Node/node-2", "Node/node-3", "Service/demo/web", "MeshConfig/mesh"} <= set(view)
    assert {"Namespace/demo", "Namespace/istio-system"} <= set(view)
    assert "AuthorizationPolicy/demo/demo-allow" in view
    assert "AuthorizationPolicy/istio-system/mesh-wide" in view  # root namespace: mesh-wide
    assert "AuthorizationPolicy/other/other-only" not in view
    assert "Namespace/other" not in view


def test_node_with_a_namespace_gets_its_policies(tmp_path: Path) -> None:
    view = _index(tmp_path).view("node-2")
    assert "Workload/other/secret-db" in view
    assert "AuthorizationPolicy/other/other-only" in view


def test_lookup_yields_minimal_peer_documents(tmp_path: Path) -> None:
    index = _index(tmp_path)
    assert index.lookup("10.244.2.100") == ["Workload/other/secret-db"]
    assert index.lookup("10.96.0.10") == [f"Workload/demo/web-{n}{j}" for n in (1, 2, 3) for j in (1, 2)]
    assert index.lookup("192.0.2.1") == []
    assert index.lookup("not-an-ip") == []
    view = index.view("node-1", ["Workload/other/secret-db", "Workload/demo/web-21"])
    secret = json.loads(view["Workload/other/secret-db"].document)
    # No label but the telemetry ones (no Service of "other" selects on anything).
    assert secret["metadata"] == {"name": "secret-db", "namespace": "other", "labels": {"app": "secret"}}
    assert secret["spec"] == {
        "serviceAccount": "secret",
        "node": "node-2",
        "ips": ["10.244.2.100"],
        "ports": [8080],
    }
    web = json.loads(view["Workload/demo/web-21"].document)
    # Only the label a Service selects on survives (so the node can pick service endpoints).
    assert web["metadata"]["labels"] == {"app": "web"}
    # A peer's namespace comes along (enrolment), its policies do not.
    assert "Namespace/other" in view
    assert "AuthorizationPolicy/other/other-only" not in view


def test_peer_keeps_telemetry_labels_only(tmp_path: Path) -> None:
    write_mesh(tmp_path / "config", nodes=3)
    extra = workload_doc("api-21", 2, "10.244.2.50")
    extra["metadata"]["labels"] = {"app": "api", "version": "v2", "team": "secret-team"}
    write_docs(tmp_path / "config" / "extra.yaml", [extra])
    store = ConfigStore(tmp_path / "config")
    assert store.load() == []
    index = ScopeIndex(store.current)
    peer = json.loads(index.view("node-1", ["Workload/demo/api-21"])["Workload/demo/api-21"].document)
    assert peer["metadata"]["labels"] == {"app": "api", "version": "v2"}


def test_own_workload_is_never_downgraded_to_peer_form(tmp_path: Path) -> None:
    index = _index(tmp_path)
    view = index.view("node-1", ["Workload/demo/web-11"])
    assert json.loads(view["Workload/demo/web-11"].document)["metadata"]["labels"]["tier"] == "gold"


def test_minimal_peer_documents_keep_both_enrolment_labels(tmp_path: Path) -> None:
    """A peer's Istio or ambit dataplane-mode label decides whether the node speaks HBONE to it."""
    write_mesh(tmp_path / "config", nodes=2)
    labels = {"istio.io/dataplane-mode": "ambient", "ambit.io/dataplane-mode": "none", "team": "x"}
    (tmp_path / "config" / "extra.yaml").write_text(
        "apiVersion: ambit.io/v1\nkind: Workload\n"
        f"metadata: {{name: labelled, namespace: other, labels: {json.dumps(labels)}}}\n"
        "spec: {serviceAccount: labelled, node: node-2, ips: [10.244.2.200]}\n"
    )
    store = ConfigStore(tmp_path / "config")
    assert store.load() == []
    view = ScopeIndex(store.current).view("node-1", ["Workload/other/labelled"])
    peer = json.loads(view["Workload/other/labelled"].document)
    assert peer["metadata"]["labels"] == {
        "istio.io/dataplane-mode": "ambient",
        "ambit.io/dataplane-mode": "none",
    }
