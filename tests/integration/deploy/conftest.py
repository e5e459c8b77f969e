"""Fixtures of the deployment tests: helm (scripts/install-helm.sh), the chart rendered, and `cluster`: a
namespace on the real API server with the agent DaemonSet, its ServiceAccount, two Nodes and the plane's
ServiceAccount bound to the chart's ClusterRole (agent pods are created by the tests, as a kubelet-less
cluster needs)."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.lab.apiserver import ApiServer
from mgmt.ca import CertificateAuthority
from tests.kube_fixtures import unique
from tests.relay_fixtures import wait_until

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "deploy" / "helm" / "ambit"
CRDS = REPO / "deploy" / "crds"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    found = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-helm.sh"), "--path"], capture_output=True, text=True
    )
    assert found.returncode == 0, "helm is not built: run `make setup` (scripts/install-helm.sh)"
    return subprocess.run(
        [found.stdout.strip(), *args], capture_output=True, text=True, timeout=120, check=check
    )


@pytest.fixture(scope="session")
def root_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mesh root's public certificate, as `--set-file ca.rootCert=` takes it."""
    ca = CertificateAuthority.generate_root("cluster.local", dt.timedelta(days=1))
    path = tmp_path_factory.mktemp("chart") / "root-cert.pem"
    path.write_bytes(ca.bundle_pem())
    return path


def render(namespace: str, root_cert: Path, *values: str) -> str:
    args = ["template", "ambit", str(CHART), "-n", namespace, "--set-file", f"ca.rootCert={root_cert}"]
    for v in values:
        args += ["--set", v]
    return helm(*args).stdout


@dataclass
class Cluster:
    api: ApiServer
    ns: str
    nodes: tuple[str, str]
    core: Any
    auth_client: Any  # authenticated as the plane: the ambit-mgmt ServiceAccount with the chart's role
    daemonset_uid: str
    plane_kubeconfig: Path  # the same credentials for `ambit mgmt --kubeconfig`

    def pod(self, name: str, node: str, sa: str = "ambit-agent", owned: bool = True) -> Any:
        from kubernetes import client

        owners = [
            client.V1OwnerReference(
                api_version="apps/v1",
                kind="DaemonSet",
                name="ambit-agent",
                uid=self.daemonset_uid,
                controller=True,
            )
        ]
        pod = client.V1Pod(
            metadata=client.V1ObjectMeta(name=name, owner_references=owners if owned else None),
            spec=client.V1PodSpec(
                node_name=node,
                service_account_name=sa,
                containers=[client.V1Container(name="agent", image="ambit:dev")],
            ),
        )
        return self.core.create_namespaced_pod(self.ns, pod)

    def token(self, sa: str, pod: Any = None, audience: str = "ambit") -> str:
        from kubernetes import client

        bound = (
            client.V1BoundObjectReference(
                kind="Pod", api_version="v1", name=pod.metadata.name, uid=pod.metadata.uid
            )
            if pod is not None
            else None
        )
        spec = client.V1TokenRequestSpec(audiences=[audience], expiration_seconds=600, bound_object_ref=bound)
        body = client.AuthenticationV1TokenRequest(spec=spec)
        return str(self.core.create_namespaced_service_account_token(sa, self.ns, body).status.token)


@pytest.fixture(scope="module")
def cluster(kube_api: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from kubernetes import client

    ns = unique("agents")
    nodes = (unique("node"), unique("node"))
    admin = kube_api.client()
    core = client.CoreV1Api(admin)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    for sa in ("ambit-agent", "ambit-mgmt", "intruder"):
        core.create_namespaced_service_account(
            ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa))
        )
    for i, node in enumerate(nodes, start=1):
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=node)))
        # As a kubelet reports it: the relay serves only nodes in the config, and a Node without an
        # InternalIP is not one (the kube source skips it).
        address = {"type": "InternalIP", "address": f"192.0.2.{i}"}
        core.patch_node_status(node, {"status": {"addresses": [address]}})
    labels = {"app": "ambit-agent"}
    ds = client.V1DaemonSet(
        metadata=client.V1ObjectMeta(name="ambit-agent"),
        spec=client.V1DaemonSetSpec(
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[client.V1Container(name="agent", image="ambit:dev")]),
            ),
        ),
    )
    ds_uid = client.AppsV1Api(admin).create_namespaced_daemon_set(ns, ds).metadata.uid
    # The plane's identity and rights are the chart's: its ClusterRole, bound to the ambit-mgmt account.
    root = tmp_path_factory.mktemp("root") / "root.pem"
    root.write_bytes(CertificateAuthority.generate_root("cluster.local").bundle_pem())
    rbac = [d for d in yaml.safe_load_all(render(ns, root)) if d and d["kind"].startswith("ClusterRole")]
    for d in rbac:
        d["metadata"]["name"] = ns
    rbac[1]["roleRef"]["name"] = ns
    kube_api.kubectl_run("apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))
    spec = client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
    plane_token = core.create_namespaced_service_account_token(
        "ambit-mgmt", ns, client.AuthenticationV1TokenRequest(spec=spec)
    ).status.token
    cfg = client.Configuration()
    cfg.host = kube_api.url
    cfg.ssl_ca_cert = str(kube_api.ca_file)
    cfg.api_key = {"authorization": plane_token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    plane_client = client.ApiClient(cfg)
    # RBAC reaches the authorizer through its informer: wait until the plane may create TokenReviews.
    auth = client.AuthenticationV1Api(plane_client)
    review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token="x"))

    def allowed() -> bool:
        try:
            auth.create_token_review(review)
            return True
        except client.exceptions.ApiException:
            return False

    assert wait_until(allowed, 10.0)
    kubeconfig = root.parent / "plane-kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "t",
                        "cluster": {"server": kube_api.url, "certificate-authority": str(kube_api.ca_file)},
                    }
                ],
                "users": [{"name": "ambit-mgmt", "user": {"token": plane_token}}],
                "contexts": [{"name": "t", "context": {"cluster": "t", "user": "ambit-mgmt"}}],
                "current-context": "t",
            }
        )
    )
    kubeconfig.chmod(0o600)
    yield Cluster(kube_api, ns, nodes, core, plane_client, ds_uid, kubeconfig)
    kube_api.kubectl_run("delete", "clusterrole,clusterrolebinding", ns, check=False)
    for node in nodes:
        core.delete_node(node)
