"""The real Kubernetes API server for tests: one etcd + kube-apiserver per test session (agent/lab/apiserver).

`kube_api` is session-scoped (start ~5 s, ~330 MB): tests share it and keep apart by unique namespace and
node names (`unique`). `kube_api.restart_apiserver()` restarts the API server on the same etcd, for the
watch-resume tests; it is ready again when the call returns.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.lab.apiserver import ApiServer
from mgmt.ca import CertificateAuthority
from mgmt.kube.source import KubeSource
from mgmt.server import MgmtServer
from mgmt.store import ConfigStore


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


CRDS = (Path(__file__).resolve().parents[1] / "deploy" / "crds").resolve()  # a link to the chart's crds/


GATEWAY_API_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gateway-api-crds.sh"


def gateway_api_crds() -> Path:
    """The Gateway API CRDs (sigs.k8s.io/gateway-api, standard channel) that `make setup` cached."""
    out = subprocess.run(["bash", str(GATEWAY_API_SCRIPT), "--path"], capture_output=True, text=True)
    assert out.returncode == 0, "the Gateway API CRDs are not fetched: run `make setup`"
    return Path(out.stdout.strip())


def install_crds(server: ApiServer) -> None:
    """The CRDs of deploy/crds (Istio's security.istio.io, ambit.io) and Gateway API's, established."""
    for crds in (CRDS, gateway_api_crds()):
        server.kubectl_run("apply", "--server-side", "--force-conflicts", "-f", str(crds))
        server.kubectl_run("wait", "--for=condition=Established", "--timeout=60s", "-f", str(crds))


@pytest.fixture(scope="session")
def kube_crds(kube_api: ApiServer) -> ApiServer:
    install_crds(kube_api)
    return kube_api


SYNC_TIMEOUT = 20.0


@dataclass
class KubePlane:
    """The plane fed by the real API server: KubeSource -> ConfigStore -> relay (mTLS)."""

    api: ApiServer
    store: ConfigStore
    source: KubeSource
    server: MgmtServer
    ca: CertificateAuthority

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        self.server.stop()
        self.source.stop()


def start_kube_plane(api: ApiServer, state: Path, trust_domain: str = "cluster.local") -> KubePlane:
    ca = CertificateAuthority.generate_root(trust_domain)
    store = ConfigStore(None, state, trust_domain=trust_domain)
    source = KubeSource(api.client(), store)
    source.start()
    assert source.wait_synced(SYNC_TIMEOUT), source.counters()
    server = MgmtServer(store, ca, "127.0.0.1:0", trust_domain)
    server.start()
    return KubePlane(api, store, source, server, ca)
