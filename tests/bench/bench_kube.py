"""Kubernetes source: 5,000 running Pods and 500 Services (+ EndpointSlices) in a real API server.

Measured: the plane's memory once synced (a child process each, RSS) against the file source holding the
same workloads and services as YAML; the first sync; and event-to-agent latency (a Pod's status patched to
Running -> a subscribed node's RelayClient holds the Workload) against the same change made through the
file source (a file written and loaded, no poll wait) on the same 5,000-workload config.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.lab import kube
from agent.lab.apiserver import ApiServer
from mgmt.ca import CertificateAuthority
from tests.kube_fixtures import install_crds, start_kube_plane
from tests.relay_fixtures import TD, Recorder, relay_client, start_plane, workload_doc, write_docs

PODS = 5000
SERVICES = 500
NODES = 10
NAMESPACES = 50
SAMPLES = 15
TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parents[2]


def _ns(i: int) -> str:
    return f"bench-{i % NAMESPACES}"


def _vip(s: int) -> str:
    return f"10.96.{1 + s // 250}.{s % 250 + 1}"  # 10.96.0.1 is the API server's own Service


def _pod_ip(i: int) -> str:
    return f"10.{200 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"


def _populate(server: ApiServer) -> float:
    api = server.client()
    for i in range(NAMESPACES):
        kube.ensure_namespace(api, _ns(i), {"ambit.io/dataplane-mode": "ambient"})
        kube.ensure_service_account(api, _ns(i), "app")
    for n in range(NODES):
        kube.ensure_node(api, f"bench-node-{n}", f"172.29.0.{n + 1}", f"10.{200 + n}.0.0/16")

    def pod(i: int) -> None:
        labels = {"app": f"app-{i % SERVICES}"}
        body = kube.pod_body(_ns(i), f"app-{i}", f"bench-node-{i % NODES}", "app", labels, [8080])
        kube.run_pod(api, body, _pod_ip(i))

    def service(s: int) -> None:
        ns = _ns(s)
        kube.create(api, kube.service_body(ns, f"app-{s}", _vip(s),
                                           [(80, "http")], {"app": f"app-{s}"}))  # fmt: skip
        ips = [_pod_ip(i) for i in range(s, PODS, SERVICES)]
        kube.create(api, kube.endpoint_slice_body(ns, f"app-{s}", {80: 8080}, ips))

    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(pod, range(PODS)))
        list(pool.map(service, range(SERVICES)))
    return time.perf_counter() - t


def _file_config(config: Path) -> None:
    """The same mesh as ambit YAML: what the file source would hold for the API server's objects."""
    config.mkdir(parents=True)
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": f"bench-node-{n}"},
            "spec": {"addresses": [f"172.29.0.{n + 1}"]},
        }  # fmt: skip
        for n in range(NODES)
    ]
    docs += [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": _ns(i), "labels": {"ambit.io/dataplane-mode": "ambient"}},
        }  # fmt: skip
        for i in range(NAMESPACES)
    ]
    docs += [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"app-{s}", "namespace": _ns(s)},
            "spec": {
                "addresses": [_vip(s)],
                "ports": [{"port": 80, "targetPort": 8080}],
                "selector": {"app": f"app-{s}"},
            },
        }  # fmt: skip
        for s in range(SERVICES)
    ]
    write_docs(config / "cluster.yaml", docs)
    pods = []
    for i in range(PODS):
        doc = workload_doc(f"app-{i}", i % NODES, _pod_ip(i), namespace=_ns(i))
        doc["metadata"]["labels"] = {"app": f"app-{i % SERVICES}"}
        doc["spec"]["node"] = f"bench-node-{i % NODES}"
        pods.append(doc)
    write_docs(config / "pods.yaml", pods)


# -- memory: each source in a child of its own, so neither inherits the other's heap -------------------
_CHILD = """
import json, sys, time, psutil
from pathlib import Path
sys.path.insert(0, {root!r})
from mgmt.store import ConfigStore
mode, arg = sys.argv[1], sys.argv[2]
base = psutil.Process().memory_info().rss
import mgmt.kube.source, mgmt.relay_service, kubernetes  # imports alike in both children
from mgmt.scope import ScopeIndex
imported = psutil.Process().memory_info().rss
t = time.perf_counter()
if mode == "files":
    store = ConfigStore(arg, trust_domain="cluster.local")
    assert store.load() == []
else:
    from mgmt.kube.client import api_client
    from mgmt.kube.source import KubeSource
    store = ConfigStore(None, trust_domain="cluster.local")
    source = KubeSource(api_client(arg), store, events=False)
    source.start()
    assert source.wait_synced(120)
index = ScopeIndex(store.current)  # what the relay builds from each version
took = time.perf_counter() - t
print(json.dumps({{"rss": psutil.Process().memory_info().rss - imported, "seconds": took,
                  "resources": len(store.current.resources)}}))
"""


def _child(mode: str, arg: str) -> dict[str, Any]:
    code = _CHILD.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, mode, arg], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} child failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- latency -------------------------------------------------------------------------------------------
def _latencies(recorder: Recorder, make: Callable[[int], str]) -> list[float]:
    """Seconds from starting each change to the node holding the new workload (uid returned by make)."""
    out = []
    for k in range(SAMPLES):
        t = time.perf_counter()
        uid = make(k)
        if recorder.wait_for(lambda s, u=uid: u in s.workloads, TIMEOUT_S) is None:  # type: ignore[misc]
            raise RuntimeError(f"{uid} never reached the node")
        out.append(time.perf_counter() - t)
    return out


def _kube_latency(server: ApiServer, state: Path) -> list[float]:
    plane = start_kube_plane(server, state)
    api = server.client()
    try:
        with relay_client(plane.target, plane.ca, "bench-node-0") as (_, rec):
            rec.wait_for(lambda s: len(s.workloads) >= PODS // NODES, TIMEOUT_S)

            def make(k: int) -> str:
                body = kube.pod_body(_ns(0), f"late-{k}", "bench-node-0", "app", {"app": "late"}, [8080])
                kube.run_pod(api, body, f"10.250.9.{k + 1}")
                return f"{_ns(0)}/late-{k}"

            return _latencies(rec, make)
    finally:
        plane.stop()


def _file_latency(config: Path, state: Path) -> list[float]:
    ca = CertificateAuthority.generate_root(TD)
    plane = start_plane(config, state, ca)
    plane.store.stop()  # the bench loads itself: the 200 ms poll is not what is compared
    try:
        with relay_client(plane.target, ca, "bench-node-0") as (_, rec):
            rec.wait_for(lambda s: len(s.workloads) >= PODS // NODES, TIMEOUT_S)

            def make(k: int) -> str:
                doc = workload_doc(f"late-{k}", 0, f"10.250.9.{k + 1}", namespace=_ns(0))
                doc["spec"]["node"] = "bench-node-0"
                write_docs(config / f"late-{k}.yaml", [doc])
                plane.store.load()
                return f"{_ns(0)}/late-{k}"

            return _latencies(rec, make)
    finally:
        plane.stop()


def _rss_mb(pids: dict[str, int]) -> float:
    import psutil

    return sum(psutil.Process(p).memory_info().rss for p in pids.values()) / 2**20


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        _file_config(tmp / "config")
        server = ApiServer().start()
        try:
            install_crds(server)
            rows.append(
                {"name": "api_populate_5000_pods_500_services", "value": _populate(server), "unit": "s"}
            )
            rows.append({"name": "apiserver_etcd_rss", "value": _rss_mb(server.pids), "unit": "MB"})
            files = _child("files", str(tmp / "config"))
            kubed = _child("kube", str(server.kubeconfig))
            assert kubed["resources"] >= files["resources"], (kubed, files)
            rows += [
                {"name": "plane_rss_files_5000_workloads", "value": files["rss"] / 2**20, "unit": "MB"},
                {
                    "name": "plane_rss_kube_5000_pods",
                    "value": kubed["rss"] / 2**20,
                    "unit": "MB",
                    "baseline": "plane_rss_files_5000_workloads",
                },  # fmt: skip
                {"name": "first_sync_files", "value": files["seconds"] * 1000, "unit": "ms"},
                {
                    "name": "first_sync_kube",
                    "value": kubed["seconds"] * 1000,
                    "unit": "ms",
                    "baseline": "first_sync_files",
                },  # fmt: skip
            ]
            kube_lat = _kube_latency(server, tmp / "kube-state")
        finally:
            server.stop()
        file_lat = _file_latency(tmp / "config", tmp / "file-state")
    for name, lat in (("files", file_lat), ("kube", kube_lat)):
        p50, p90 = statistics.median(lat) * 1000, sorted(lat)[int(len(lat) * 0.9) - 1] * 1000
        for stat, value in (("p50", p50), ("p90", p90)):
            row = {"name": f"event_to_agent_{stat}_{name}", "value": value, "unit": "ms"}
            if name == "kube":
                row["baseline"] = f"event_to_agent_{stat}_files"
            rows.append(row)
    return rows
