"""An edge gateway's bootstrap with its pod's ServiceAccount token, checked by the plane against the real API
server (TokenReview with the chart's ClusterRole, then the pod and its ReplicaSet's Deployment): a pod of the
Gateway's Deployment running as the Gateway's service account buys the Gateway's SVID; a token of another
service account or namespace, or of a pod outside the Deployment, is refused, counted and audited."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.identity.bootstrap import JoinError, join
from api.jsonlog import AuditLog
from mgmt.bootstrap import BootstrapServer
from mgmt.ca import CertificateAuthority
from mgmt.gateway_scope import GatewayIndex
from mgmt.join_tokens import JoinTokens
from mgmt.kube_bootstrap import AgentPods, KubeNodeVerifier
from mgmt.store import ConfigSnapshot, StoredResource, stored
from tests.integration.deploy.conftest import Cluster
from tests.kube_fixtures import unique

TD = "cluster.local"
SA = "edge-ambit"  # the service account (and Deployment) of Gateway edge, class ambit


def _gateway(namespace: str) -> StoredResource:
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "edge", "namespace": namespace},
        "spec": {"gatewayClassName": "ambit", "listeners": [{"name": "h", "port": 80, "protocol": "HTTP"}]},
    }
    res = stored(doc, "test")
    assert isinstance(res, StoredResource)
    return res


@pytest.fixture(scope="module")
def plane(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BootstrapServer, Path]]:
    from kubernetes import client

    for sa in (SA, "web"):
        cluster.core.create_namespaced_service_account(
            cluster.ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa))
        )
    state = tmp_path_factory.mktemp("gwplane")
    ca = CertificateAuthority.generate_root(TD)
    gateways = [_gateway(cluster.ns), _gateway("elsewhere")]
    snapshot = ConfigSnapshot(1, "x", {str(r.key): r for r in gateways})
    verifier = KubeNodeVerifier(cluster.auth_client, AgentPods(cluster.ns, "ambit-agent", "ambit-agent"))
    server = BootstrapServer(
        ca,
        JoinTokens(state),
        "127.0.0.1:0",
        AuditLog(state / "audit.jsonl"),
        kube=verifier,
        gateways=lambda: GatewayIndex(snapshot, TD),
    )
    server.start()
    (state / "bundle.pem").write_bytes(ca.bundle_pem())
    yield server, state
    server.stop()


def _deployment_pod(cluster: Cluster, name: str, sa: str = SA, deployment: str = SA) -> Any:
    """A pod controlled by a ReplicaSet controlled by Deployment `deployment` (as the controllers would
    make them; the test API server runs no controller-manager)."""
    from kubernetes import client

    apps = client.AppsV1Api(cluster.api.client())
    labels = {"app": name}
    template = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=labels),
        spec=client.V1PodSpec(containers=[client.V1Container(name="gw", image="ambit:dev")]),
    )
    selector = client.V1LabelSelector(match_labels=labels)
    dep = (
        apps.create_namespaced_deployment(
            cluster.ns,
            client.V1Deployment(
                metadata=client.V1ObjectMeta(name=deployment),
                spec=client.V1DeploymentSpec(selector=selector, template=template),
            ),
        )
        if deployment
        else None
    )
    owner = (
        [
            client.V1OwnerReference(
                api_version="apps/v1",
                kind="Deployment",
                name=deployment,
                uid=dep.metadata.uid,
                controller=True,
            )
        ]
        if dep is not None
        else None
    )
    rs = apps.create_namespaced_replica_set(
        cluster.ns,
        client.V1ReplicaSet(
            metadata=client.V1ObjectMeta(name=unique(name), owner_references=owner),
            spec=client.V1ReplicaSetSpec(selector=selector, template=template),
        ),
    )
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=unique(name),
            labels=labels,
            owner_references=[
                client.V1OwnerReference(
                    api_version="apps/v1",
                    kind="ReplicaSet",
                    name=rs.metadata.name,
                    uid=rs.metadata.uid,
                    controller=True,
                )
            ],
        ),
        spec=client.V1PodSpec(
            node_name=cluster.nodes[0],
            service_account_name=sa,
            containers=[client.V1Container(name="gw", image="ambit:dev")],
        ),
    )
    return cluster.core.create_namespaced_pod(cluster.ns, pod)


def _join(plane: tuple[BootstrapServer, Path], token: str, gateway: str) -> Any:
    server, state = plane
    return join(
        f"127.0.0.1:{server.port}",
        token,
        "",
        (state / "bundle.pem").read_bytes(),
        timeout=5,
        service_account=True,
        gateway=gateway,
    )


def _refused(plane: tuple[BootstrapServer, Path], token: str, gateway: str, kind: str) -> str:
    with pytest.raises(JoinError) as exc:
        _join(plane, token, gateway)
    assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED, exc.value
    last = json.loads((plane[1] / "audit.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "join_refused" and last["kind"] == kind and last["gateway"] == gateway
    assert token not in json.dumps(last)
    return str(exc.value)


def test_gateway_pod_token_buys_the_gateway_identity(
    cluster: Cluster, plane: tuple[BootstrapServer, Path]
) -> None:
    pod = _deployment_pod(cluster, "edge")
    identity = _join(plane, cluster.token(SA, pod), f"{cluster.ns}/edge")
    assert str(identity.spiffe_id) == f"spiffe://{TD}/ns/{cluster.ns}/sa/{SA}"
    last = json.loads((plane[1] / "audit.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "gateway_joined" and last["pod_uid"] == pod.metadata.uid
    assert plane[0].counters()["gateways_joined"] >= 1


def test_tokens_of_other_accounts_namespaces_and_pods_are_refused(
    cluster: Cluster, plane: tuple[BootstrapServer, Path]
) -> None:
    gateway = f"{cluster.ns}/edge"
    web = _deployment_pod(cluster, "web", sa="web", deployment="web")
    assert "not of system:serviceaccount" in _refused(
        plane, cluster.token("web", web), gateway, "wrong_service_account"
    )
    agent = cluster.pod(unique("agent"), cluster.nodes[0])
    _refused(plane, cluster.token("ambit-agent", agent), gateway, "wrong_service_account")
    # The right account in a pod outside the Gateway's Deployment.
    stray = _deployment_pod(cluster, "stray", deployment="")
    assert "not controlled by Deployment" in _refused(
        plane, cluster.token(SA, stray), gateway, "not_gateway_pod"
    )
    # The Gateway's account, but the Gateway is in another namespace.
    pod = _deployment_pod(cluster, "edge2", deployment=unique("other"))
    _refused(plane, cluster.token(SA, pod), "elsewhere/edge", "wrong_service_account")
    assert plane[0].counters()["refused_permission_denied"] >= 4
