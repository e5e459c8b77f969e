"""ConfigStore: load, per-document validity with file:line, last good objects kept, versions, live watch."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import yaml

from mgmt.store import ConfigStore
from tests.relay_fixtures import workload_doc, write_docs, write_mesh


def _store(tmp_path: Path) -> ConfigStore:
    write_mesh(tmp_path / "config")
    return ConfigStore(tmp_path / "config", tmp_path / "state")


def test_load_parses_every_kind_and_versions(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.version == 0
    assert store.load() == []
    assert store.version == 1
    kinds = {r.kind for r in store.current.resources.values()}
    assert {"Workload", "Namespace", "Service", "Node", "AuthorizationPolicy", "MeshConfig"} <= kinds
    assert [w.uid for w in store.workloads_on_node("node-1")] == ["demo/web-11", "demo/web-12"]
    assert store.identities_on_node("node-2") == frozenset(
        {"spiffe://cluster.local/ns/demo/sa/web", "spiffe://cluster.local/ns/other/sa/secret"}
    )
    assert len(store.content_hash) == 64
    # Reading the same content again is not a new version.
    assert store.load() == []
    assert store.version == 1


def test_invalid_yaml_reported_with_file_line_and_the_rest_applies(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.load()
    good_hash = store.content_hash
    bad = tmp_path / "config" / "bad.yaml"
    bad.write_text("apiVersion: ambit.io/v1\nkind: Workload\nmetadata: {name: x\n  namespace: demo\n")
    errors = store.load()
    assert len(errors) == 1
    assert errors[0].where.startswith(f"{bad}:")
    assert "invalid YAML" in errors[0].reason
    assert (store.version, store.content_hash) == (1, good_hash)  # that file held nothing before
    assert store.errors == errors
    assert store.counters()["invalid_documents"] == 1


def test_invalid_document_names_its_line_in_a_multi_document_file(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.load()
    path = tmp_path / "config" / "more.yaml"
    good = workload_doc("api-1", 1, "10.244.1.50")
    bad = workload_doc("api-2", 1, "10.244.1.51")
    bad["spec"]["colour"] = "blue"
    write_docs(path, [good, bad])
    errors = store.load()
    bad_line = path.read_text().splitlines().index("---") + 2
    assert [str(e) for e in errors] == [f"{path}:{bad_line}: Workload api-2: unknown spec field(s): colour"]
    assert errors[0].key == "Workload/demo/api-2"
    # One typo never blocks unrelated objects: api-1 applies, api-2 is skipped.
    assert store.version == 2
    assert "Workload/demo/api-1" in store.current.resources
    assert "Workload/demo/api-2" not in store.current.resources


def test_duplicate_and_unknown_kind_rejected(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.load()
    write_docs(tmp_path / "config" / "dup.yaml", [workload_doc("web-11", 1, "10.244.1.9")])
    (tmp_path / "config" / "odd.yml").write_text("apiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n")
    reasons = sorted(e.reason for e in store.load())
    assert reasons[0].startswith("duplicate Workload/demo/web-11 (first defined at")
    assert reasons[1].startswith("unknown kind 'Gadget'")
    assert store.version == 1  # the first definition (in path order) stays; nothing else changed


def test_version_persists_across_restart(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.load()
    write_docs(tmp_path / "config" / "extra.yaml", [workload_doc("api-1", 1, "10.244.1.50")])
    store.load()
    assert store.version == 2
    again = ConfigStore(tmp_path / "config", tmp_path / "state")
    again.load()
    assert (again.version, again.content_hash) == (2, store.content_hash)
    (tmp_path / "config" / "extra.yaml").unlink()
    third = ConfigStore(tmp_path / "config", tmp_path / "state")
    third.load()
    assert third.version == 3  # monotonic even when content returns to an older state


def test_watch_picks_up_changes_and_notifies(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.poll_interval = 0.05
    store.load()
    seen: list[int] = []
    changed = threading.Event()

    def listener(snapshot: object) -> None:
        seen.append(store.version)
        changed.set()

    store.add_listener(listener)
    store.watch()
    try:
        write_docs(tmp_path / "config" / "extra.yaml", [workload_doc("api-1", 1, "10.244.1.50")])
        assert changed.wait(10)
        assert seen == [2]
        assert "Workload/demo/api-1" in store.current.resources
    finally:
        store.stop()


def test_missing_directory_is_an_error_not_a_crash(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path / "nope")
    errors = store.load()
    assert errors and "does not exist" in errors[0].reason
    assert store.version == 0


def test_object_that_turns_invalid_keeps_its_last_good_version(tmp_path: Path) -> None:
    """A typo in an edited DENY policy must not drop the policy (fail closed), nor block the other edits."""
    store = _store(tmp_path)
    path = tmp_path / "config" / "deny.yaml"
    deny = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-all", "namespace": "demo"},
        "spec": {"action": "DENY", "rules": [{}]},
    }
    write_docs(path, [deny, workload_doc("api-1", 1, "10.244.1.50")])
    assert store.load() == []
    before = store.current.resources["AuthorizationPolicy/demo/deny-all"]
    deny["spec"]["acton"] = "DENY"
    write_docs(path, [deny, workload_doc("api-1", 1, "10.244.1.51")])
    errors = store.load()
    assert [e.key for e in errors] == ["AuthorizationPolicy/demo/deny-all"]
    assert store.current.resources["AuthorizationPolicy/demo/deny-all"] is before
    assert store.current.resources["Workload/demo/api-1"].obj.ips == ("10.244.1.51",)


def test_unparseable_file_keeps_all_its_objects(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.load() == []
    node1 = tmp_path / "config" / "node-1.yaml"
    keys = {k for k, r in store.current.resources.items() if r.where.startswith(f"{node1}:")}
    assert keys
    node1.write_text(node1.read_text() + "---\nkind: [unclosed\n")
    write_docs(tmp_path / "config" / "extra.yaml", [workload_doc("api-1", 1, "10.244.1.50")])
    errors = store.load()
    assert len(errors) == 1 and "invalid YAML" in errors[0].reason
    assert keys <= set(store.current.resources)
    assert "Workload/demo/api-1" in store.current.resources


def test_duplicate_yaml_key_rejects_that_document_only(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.load()
    path = tmp_path / "config" / "dup-key.yaml"
    path.write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: demo}\nspec:\n  action: DENY\n  rules: [{}]\n  action: ALLOW\n"
        "---\n" + yaml.safe_dump(workload_doc("api-1", 1, "10.244.1.50"))
    )
    errors = store.load()
    assert len(errors) == 1
    assert errors[0].where == f"{path}:7" and "duplicate key 'action'" in errors[0].reason
    assert "AuthorizationPolicy/demo/p" not in store.current.resources
    assert "Workload/demo/api-1" in store.current.resources


def test_accepts_kubectl_get_output(tmp_path: Path) -> None:
    """`kubectl get -o yaml` adds status, uid, timestamps, managedFields, resourceVersion and wraps
    several objects in a List: all of it is server state, dropped before parsing (and hashing)."""
    store = _store(tmp_path)
    store.load()
    (tmp_path / "config" / "from-cluster.yaml").write_text(
        """apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: '{"apiVersion":"security.istio.io/v1"}'
    creationTimestamp: "2026-12-01T10:00:00Z"
    generation: 3
    managedFields:
    - {apiVersion: security.istio.io/v1, manager: kubectl, operation: Update}
    name: allow-web
    namespace: demo
    resourceVersion: "4242"
    uid: 6f1c1e9e-8a43-4a5e-9a55-4c3b1d1e2f00
  spec: {action: ALLOW, rules: [{from: [{source: {namespaces: [demo]}}]}]}
  status: {conditions: [{type: Accepted, status: "True"}]}
- apiVersion: v1
  kind: Namespace
  metadata: {name: extra, creationTimestamp: 2026-12-01T10:00:00Z, uid: x}
  spec: {finalizers: [kubernetes]}
  status: {phase: Active}
"""
    )
    assert store.load() == []
    res = store.current.resources["AuthorizationPolicy/demo/allow-web"]
    assert res.where.endswith("from-cluster.yaml:5")
    assert b"managedFields" not in res.document and b"last-applied" not in res.document
    assert "Namespace/extra" in store.current.resources


def test_accepts_core_kubernetes_objects_as_kubectl_prints_them(tmp_path: Path) -> None:
    """`kubectl get pods,services,nodes -o yaml` into the config dir: translated as the Kubernetes source
    does (a Running pod with an IP is a Workload, a pending one is not; Services by cluster IP)."""
    store = _store(tmp_path)
    store.load()
    (tmp_path / "config" / "cluster-dump.yaml").write_text(
        """apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: api-0, namespace: demo, labels: {app: api}, uid: a, resourceVersion: "9"}
  spec:
    nodeName: node-1
    serviceAccountName: api
    containers: [{name: c, image: x, ports: [{containerPort: 9000, protocol: TCP}]}]
  status: {phase: Running, podIP: 10.244.1.77, podIPs: [{ip: 10.244.1.77}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: api-1, namespace: demo}
  spec: {nodeName: node-1, containers: [{name: c, image: x}]}
  status: {phase: Pending}
- apiVersion: v1
  kind: Service
  metadata: {name: api, namespace: demo}
  spec:
    type: ClusterIP
    clusterIP: 10.96.0.77
    clusterIPs: [10.96.0.77]
    selector: {app: api}
    sessionAffinity: None
    ports: [{name: http, port: 80, protocol: TCP, targetPort: 9000}]
  status: {loadBalancer: {}}
- apiVersion: v1
  kind: Node
  metadata: {name: node-9, labels: {kubernetes.io/os: linux}}
  spec: {podCIDR: 10.244.9.0/24, podCIDRs: [10.244.9.0/24], providerID: "x"}
  status: {addresses: [{type: InternalIP, address: 172.30.0.9}, {type: Hostname, address: node-9}]}
"""
    )
    assert store.load() == []
    w = store.current.resources["Workload/demo/api-0"].obj
    assert (w.node, w.service_account, w.ips, w.ports) == ("node-1", "api", ("10.244.1.77",), (9000,))
    assert "Workload/demo/api-1" not in store.current.resources
    svc = store.current.resources["Service/demo/api"].obj
    assert svc.addresses == ("10.96.0.77",) and [(p.port, p.target_port) for p in svc.ports] == [(80, 9000)]
    assert store.current.resources["Node/node-9"].obj.addresses == ("172.30.0.9",)


def test_invalid_document_logged_once_until_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path)
    store.load()
    bad = tmp_path / "config" / "bad.yaml"
    bad.write_text("kind: Nope\n")
    with caplog.at_level(logging.ERROR, logger="ambit.mgmt.store"):
        store.load()
        store.load()  # what the watch's re-read of a file caught half-written does
        assert len([r for r in caplog.records if "skipped invalid document" in r.message]) == 1
        bad.write_text("kind: Nope2\n")
        store.load()
        assert len([r for r in caplog.records if "skipped invalid document" in r.message]) == 2


def test_a_reference_grant_that_turns_invalid_is_revoked_not_kept(tmp_path: Path) -> None:
    """A grant only allows: its fail-closed side is to drop it, whether its document or its file broke."""
    from tests.gateway_fixtures import reference_grant_doc

    store = _store(tmp_path)
    path = tmp_path / "config" / "grants.yaml"
    grant = reference_grant_doc("certs", "bank", "Gateway", "shop", "Secret")
    write_docs(path, [grant])
    assert store.load() == []
    assert "ReferenceGrant/bank/certs" in store.current.resources
    grant["spec"]["to"][0]["name"] = ""
    write_docs(path, [grant])
    assert [e.key for e in store.load()] == ["ReferenceGrant/bank/certs"]
    assert "ReferenceGrant/bank/certs" not in store.current.resources
    write_docs(path, [reference_grant_doc("certs", "bank", "Gateway", "shop", "Secret")])
    assert store.load() == [] and "ReferenceGrant/bank/certs" in store.current.resources
    path.write_text(path.read_text() + "---\nkind: [unclosed\n")
    assert len(store.load()) == 1
    assert "ReferenceGrant/bank/certs" not in store.current.resources
