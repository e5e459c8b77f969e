"""Sample mesh configuration (YAML files) and a running plane for the config store and relay tests.

Layout of the sample: nodes node-1..node-N; namespace `demo` (ambient) holds `pods` workloads per node;
node-2 additionally runs `other/secret-db` whose namespace has its own policy, so node-1 must see neither.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from agent.relay.client import RelayClient
from agent.state import MeshSnapshot
from mgmt.ca import CertificateAuthority
from mgmt.server import SERVER_NAME, MgmtServer, node_channel_credentials
from mgmt.store import ConfigStore

TD = "cluster.local"


def workload_doc(name: str, node: int, ip: str, namespace: str = "demo", **labels: str) -> dict:
    return {
        "apiVersion": "ambit.io/v1",
        "kind": "Workload",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": name.rsplit("-", 1)[0], **labels},
        },
        "spec": {
            "serviceAccount": name.rsplit("-", 1)[0],
            "node": f"node-{node}",
            "ips": [ip],
            "ports": [8080],
        },
    }


def write_docs(path: Path, docs: list[dict]) -> None:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def write_mesh(config_dir: Path, nodes: int = 2, pods: int = 2) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    write_docs(
        config_dir / "cluster.yaml",
        [
            {"apiVersion": "ambit.io/v1", "kind": "MeshConfig", "metadata": {"name": "mesh"}, "spec": {}},
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "demo", "labels": {"ambit.io/dataplane-mode": "ambient"}},
            },
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}},
            *[
                {
                    "apiVersion": "ambit.io/v1",
                    "kind": "Node",
                    "metadata": {"name": f"node-{n}"},
                    "spec": {"addresses": [f"172.30.0.{n}"]},
                }
                for n in range(1, nodes + 1)
            ],
            {
                "apiVersion": "ambit.io/v1",
                "kind": "Service",
                "metadata": {"name": "web", "namespace": "demo"},
                "spec": {
                    "addresses": ["10.96.0.10"],
                    "ports": [{"port": 80, "targetPort": 8080}],
                    "selector": {"app": "web"},
                },
            },
            _policy("demo-allow", "demo"),
            _policy("mesh-wide", "istio-system"),
            _policy("other-only", "other"),
        ],
    )
    for n in range(1, nodes + 1):
        docs = [
            workload_doc(f"web-{n}{j}", n, f"10.244.{n}.{j + 1}", tier="gold") for j in range(1, pods + 1)
        ]
        if n == 2:
            docs.append(workload_doc("secret-db", 2, "10.244.2.100", namespace="other"))
        write_docs(config_dir / f"node-{n}.yaml", docs)


def _policy(name: str, namespace: str) -> dict:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["demo"]}}]}]},
    }


@dataclass
class Plane:
    store: ConfigStore
    server: MgmtServer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        self.server.stop()
        self.store.stop()


def start_plane(
    config_dir: Path, state_dir: Path, ca: CertificateAuthority, listen: str = "127.0.0.1:0"
) -> Plane:
    store = ConfigStore(config_dir, state_dir, trust_domain=TD)
    assert store.load() == []
    store.watch()
    server = MgmtServer(store, ca, listen, TD)
    server.start()
    return Plane(store, server)


def wait_until(pred: Callable[[], object], timeout: float) -> bool:
    """Poll `pred` until it is truthy (True) or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Recorder:
    """on_snapshot target: keeps every snapshot the client applied and lets a test wait for one."""

    def __init__(self) -> None:
        self.snapshots: list[MeshSnapshot] = []
        self._cond = threading.Condition()

    def __call__(self, snapshot: MeshSnapshot) -> None:
        with self._cond:
            self.snapshots.append(snapshot)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[MeshSnapshot], bool], timeout: float) -> MeshSnapshot | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for s in reversed(self.snapshots):
                    if pred(s):
                        return s
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)


@contextmanager
def relay_client(
    plane_target: str,
    ca: CertificateAuthority,
    node: str,
    validate: Callable[[MeshSnapshot], None] | None = None,
    cert_node: str | None = None,
) -> Iterator[tuple[RelayClient, Recorder]]:
    recorder = Recorder()
    client = RelayClient(
        plane_target,
        node,
        node_channel_credentials(ca, cert_node or node),
        on_snapshot=recorder,
        validate=validate,
        server_name=SERVER_NAME,
        backoff_initial=0.05,
        backoff_max=0.5,
    )
    client.start()
    try:
        yield client, recorder
    finally:
        client.stop()
