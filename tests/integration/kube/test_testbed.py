"""The API server test bed itself: real kube-apiserver + etcd, pinned kubectl, restart on the same etcd."""

from __future__ import annotations

import json

from agent.lab.apiserver import ApiServer
from tests.kube_fixtures import unique


def test_serves_the_pinned_version_to_the_pinned_kubectl(kube_api: ApiServer) -> None:
    out = json.loads(kube_api.kubectl_run("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"] == "v1.37.2"
    assert out["clientVersion"]["gitVersion"] == "v1.37.2"


def test_restart_keeps_etcd_state(kube_api: ApiServer) -> None:
    from kubernetes import client

    name = unique("keep")
    kube_api.kubectl_run("create", "namespace", name)
    kube_api.restart_apiserver()
    names = [n.metadata.name for n in client.CoreV1Api(kube_api.client()).list_namespace().items]
    assert name in names


def test_rbac_applies_to_other_identities(kube_api: ApiServer) -> None:
    """Only the admin token is system:masters; an impersonated user without roles is refused."""
    out = kube_api.kubectl_run("get", "pods", "-A", "--as=someone", check=False)
    assert out.returncode != 0 and "forbidden" in out.stderr
