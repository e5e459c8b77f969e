"""status.conditions on policy objects, written by the plane's Kubernetes source on the real API server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.lab.apiserver import ApiServer
from tests.kube_fixtures import KubePlane, start_kube_plane, unique
from tests.relay_fixtures import wait_until

TIMEOUT = 15.0
DENY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec: {{action: DENY, rules: [{{from: [{{source: {{namespaces: [other]}}}}]}}]}}
"""
REGO = """apiVersion: ambit.io/v1
kind: RegoPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec:
  module: {module}
"""
GOOD_MODULE = json.dumps("package ambit\ndefault authz := true")
BAD_MODULE = json.dumps("package ambit\nauthz := input.x +")


@pytest.fixture
def plane(kube_crds: ApiServer, tmp_path: Path) -> Iterator[KubePlane]:
    p = start_kube_plane(kube_crds, tmp_path / "state")
    yield p
    p.stop()


def _accepted(api: ApiServer, resource: str, ns: str, name: str) -> dict[str, Any] | None:
    out = api.kubectl_run("get", resource, name, "-n", ns, "-o", "json")
    obj = json.loads(out.stdout)
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == "Accepted":
            return {**cond, "generation": obj["metadata"]["generation"]}
    return None


def _wait_accepted(api: ApiServer, resource: str, ns: str, name: str, status: str, generation: int) -> dict:
    got: dict[str, Any] = {}

    def ready() -> bool:
        got.update(_accepted(api, resource, ns, name) or {})
        return got.get("status") == status and got.get("observedGeneration") == generation

    assert wait_until(ready, TIMEOUT), got
    return got


def test_plane_writes_accepted_conditions_and_skips_what_would_not_compile(plane: KubePlane) -> None:
    api = plane.api
    ns = unique("status")
    api.kubectl_run("create", "namespace", ns)
    api.kubectl_run("apply", "-f", "-", stdin=DENY.format(name="deny-other", ns=ns))
    api.kubectl_run("apply", "-f", "-", stdin=REGO.format(name="broken", ns=ns, module=BAD_MODULE))

    good = _wait_accepted(api, "authorizationpolicy", ns, "deny-other", "True", 1)
    assert good["reason"] == "Accepted"
    bad = _wait_accepted(api, "regopolicy", ns, "broken", "False", 1)
    assert bad["reason"] == "Invalid" and "module does not compile" in bad["message"]
    # Skipped, so no agent NACKs the version for it; the valid policy beside it is in force.
    written = plane.source.counters()["status_written"]  # objects of other tests on this server included
    keys = set(plane.store.current.resources)
    assert f"AuthorizationPolicy/{ns}/deny-other" in keys and f"RegoPolicy/{ns}/broken" not in keys

    api.kubectl_run("apply", "-f", "-", stdin=REGO.format(name="broken", ns=ns, module=GOOD_MODULE))
    fixed = _wait_accepted(api, "regopolicy", ns, "broken", "True", 2)
    assert fixed["lastTransitionTime"] >= bad["lastTransitionTime"]
    assert wait_until(lambda: f"RegoPolicy/{ns}/broken" in plane.store.current.resources, TIMEOUT)

    # Our own status writes come back as MODIFIED events and must not cause more writes: objects added
    # after them, on the same watches, get theirs, and the count is exactly one per verdict change since.
    api.kubectl_run("apply", "-f", "-", stdin=DENY.format(name="probe", ns=ns))
    api.kubectl_run("apply", "-f", "-", stdin=REGO.format(name="probe", ns=ns, module=GOOD_MODULE))
    _wait_accepted(api, "authorizationpolicy", ns, "probe", "True", 1)
    _wait_accepted(api, "regopolicy", ns, "probe", "True", 1)
    assert plane.source.counters()["status_written"] == written + 3


def test_cluster_scoped_mesh_config_gets_its_verdict(plane: KubePlane) -> None:
    api = plane.api
    name = unique("mesh")
    doc = f"apiVersion: ambit.io/v1\nkind: MeshConfig\nmetadata: {{name: {name}}}\n"
    doc += "spec: {trustDomain: other.td}\n"
    api.kubectl_run("apply", "-f", "-", stdin=doc)
    try:
        got: dict[str, Any] = {}

        def written() -> bool:
            obj = json.loads(api.kubectl_run("get", "meshconfig", name, "-o", "json").stdout)
            got.update(next(iter(obj.get("status", {}).get("conditions", [])), {}))
            return got.get("status") == "False"

        assert wait_until(written, TIMEOUT), got
        assert "differs from this agent's trust domain" in got["message"]
        assert f"MeshConfig/{name}" not in plane.store.current.resources
    finally:
        api.kubectl_run("delete", "meshconfig", name)
