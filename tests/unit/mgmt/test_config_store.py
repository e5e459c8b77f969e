"""ConfigStore: load, validation with file:line, last good config kept, versions persisted, live watch."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

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


def test_invalid_yaml_rejected_with_file_line_and_last_good_kept(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.load()
    good_hash = store.content_hash
    bad = tmp_path / "config" / "bad.yaml"
    bad.write_text("apiVersion: ambit.io/v1\nkind: Workload\nmetadata: {name: x\n  namespace: demo\n")
    errors = store.load()
    assert len(errors) == 1
    assert errors[0].where.startswith(f"{bad}:")
    assert "invalid YAML" in errors[0].reason
    assert (store.version, store.content_hash) == (1, good_hash)
    assert store.errors == errors


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
    assert store.version == 1
    assert "Workload/demo/api-1" not in store.current.resources  # all or nothing


def test_duplicate_and_unknown_kind_rejected(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.load()
    write_docs(tmp_path / "config" / "dup.yaml", [workload_doc("web-11", 1, "10.244.1.9")])
    (tmp_path / "config" / "odd.yml").write_text("apiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n")
    reasons = sorted(e.reason for e in store.load())
    assert reasons[0].startswith("duplicate Workload/demo/web-11 (first defined at")
    assert reasons[1].startswith("unknown kind 'Gadget'")
    assert store.version == 1


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


def test_rejected_config_logged_once_until_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path)
    store.load()
    bad = tmp_path / "config" / "bad.yaml"
    bad.write_text("kind: Nope\n")
    with caplog.at_level(logging.ERROR, logger="ambit.mgmt.store"):
        store.load()
        store.load()  # what the watch's re-read of a rejected tree does
        assert len([r for r in caplog.records if "config rejected" in r.message]) == 1
        bad.write_text("kind: Nope2\n")
        store.load()
        assert len([r for r in caplog.records if "config rejected" in r.message]) == 2
