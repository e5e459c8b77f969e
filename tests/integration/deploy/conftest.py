"""Fixtures of the deployment tests: helm (scripts/install-helm.sh) and the chart rendered once."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest

from mgmt.ca import CertificateAuthority

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
