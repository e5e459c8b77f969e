"""The real Kubernetes API server for tests: one etcd + kube-apiserver per test session (agent/lab/apiserver).

`kube_api` is session-scoped (start ~5 s, ~330 MB): tests share it and keep apart by unique namespace and
node names (`unique`). `kube_api.restart_apiserver()` restarts the API server on the same etcd, for the
watch-resume tests; it is ready again when the call returns.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lab.apiserver import ApiServer


@pytest.fixture(scope="session")
def kube_api() -> Iterator[ApiServer]:
    server = ApiServer()
    try:
        yield server.start()
    finally:
        server.stop()


def unique(prefix: str) -> str:
    """A DNS-1123 name no other test of the session uses."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def kube_crds(kube_api: ApiServer) -> ApiServer:
    """`kube_api` with ambit's CRDs (deploy/crds: Istio's security.istio.io kinds, ambit.io) established."""
    crds = Path(__file__).resolve().parents[1] / "deploy" / "crds"
    kube_api.kubectl_run("apply", "--server-side", "--force-conflicts", "-f", f"{crds}/")
    kube_api.kubectl_run("wait", "--for=condition=Established", "--timeout=60s", "-f", f"{crds}/")
    return kube_api
