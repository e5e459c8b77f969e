"""Node bootstrap with the agent pod's ServiceAccount token, checked by the plane against the real API server.

The plane runs with the chart's own ClusterRole (as the ambit-mgmt ServiceAccount's token), the agent with
the real `join()`. A good token of a DaemonSet pod on node N buys spiffe://td/node/N; another pod's, another
node's, another ServiceAccount's, another audience's or a deleted pod's token is refused and audited.
"""

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
from mgmt.join_tokens import JoinTokens
from mgmt.kube_bootstrap import AgentPods, KubeNodeVerifier
from tests.integration.deploy.conftest import Cluster
from tests.kube_fixtures import unique

TD = "cluster.local"


@pytest.fixture(scope="module")
def plane(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BootstrapServer, Path]]:
    state = tmp_path_factory.mktemp("plane")
    ca = CertificateAuthority.generate_root(TD)
    audit = AuditLog(state / "audit.jsonl")
    verifier = KubeNodeVerifier(cluster.auth_client, AgentPods(cluster.ns, "ambit-agent", "ambit-agent"))
    server = BootstrapServer(ca, JoinTokens(state), "127.0.0.1:0", audit, kube=verifier)
    server.start()
    (state / "bundle.pem").write_bytes(ca.bundle_pem())
    yield server, state
    server.stop()


def _join(plane: tuple[BootstrapServer, Path], token: str, node: str) -> Any:
    server, state = plane
    bundle = (state / "bundle.pem").read_bytes()
    return join(f"127.0.0.1:{server.port}", token, node, bundle, timeout=5, service_account=True)


def _refused(
    plane: tuple[BootstrapServer, Path], token: str, node: str, kind: str, *alternatives: str
) -> JoinError:
    with pytest.raises(JoinError) as exc:
        _join(plane, token, node)
    assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED, exc.value
    records = [json.loads(line) for line in (plane[1] / "audit.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["event"] == "join_refused" and last["kind"] in (kind, *alternatives) and last["node"] == node
    assert token not in json.dumps(records)  # only a fingerprint
    return exc.value


def test_agent_pod_token_buys_its_node_identity(
    cluster: Cluster, plane: tuple[BootstrapServer, Path]
) -> None:
    node_a, node_b = cluster.nodes
    for node in (node_a, node_b):
        pod = cluster.pod(unique("agent"), node)
        identity = _join(plane, cluster.token("ambit-agent", pod), node)
        assert str(identity.spiffe_id) == f"spiffe://{TD}/node/{node}"
    last = json.loads((plane[1] / "audit.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "node_joined" and last["method"] == "service_account"
    assert last["pod"].startswith(f"{cluster.ns}/agent-") and last["pod_uid"] == pod.metadata.uid


def test_another_nodes_token_is_refused(cluster: Cluster, plane: tuple[BootstrapServer, Path]) -> None:
    node_a, node_b = cluster.nodes
    token = cluster.token("ambit-agent", cluster.pod(unique("agent"), node_a))
    assert f"not {node_b}" in str(_refused(plane, token, node_b, "wrong_node"))


def test_another_pods_token_is_refused(cluster: Cluster, plane: tuple[BootstrapServer, Path]) -> None:
    node_a, _ = cluster.nodes
    # A pod that is not the DaemonSet's, even with the agent's ServiceAccount on the right node.
    stray = cluster.pod(unique("stray"), node_a, owned=False)
    assert "not controlled by DaemonSet" in str(
        _refused(plane, cluster.token("ambit-agent", stray), node_a, "not_agent_pod")
    )
    intruder = cluster.pod(unique("intruder"), node_a, sa="intruder")
    _refused(plane, cluster.token("intruder", intruder), node_a, "wrong_service_account")


def test_tokens_not_bound_to_a_live_agent_pod_are_refused(
    cluster: Cluster, plane: tuple[BootstrapServer, Path]
) -> None:
    node_a, _ = cluster.nodes
    _refused(plane, cluster.token("ambit-agent"), node_a, "not_pod_bound")
    pod = cluster.pod(unique("agent"), node_a)
    _refused(plane, cluster.token("ambit-agent", pod, audience="other"), node_a, "token_invalid")
    token = cluster.token("ambit-agent", pod)
    cluster.core.delete_namespaced_pod(pod.metadata.name, cluster.ns, grace_period_seconds=0)
    # The API server stops authenticating it once its pod cache saw the deletion; until then the token
    # review passes and the plane's own pod lookup refuses it: either way a refusal, never a join.
    _refused(plane, token, node_a, "token_invalid", "pod_gone")
    _refused(plane, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", node_a, "token_invalid")


def test_plane_without_kube_bootstrap_refuses_service_account_tokens(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate_root(TD)
    server = BootstrapServer(ca, JoinTokens(tmp_path), "127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(JoinError) as exc:
            join(
                f"127.0.0.1:{server.port}",
                "a.b.c",
                "node-1",
                ca.bundle_pem(),
                timeout=5,
                service_account=True,
            )
        assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert server.counters()["refused_unauthenticated"] == 1
    finally:
        server.stop()
