"""A plane fed by the real API server, one per module (tests keep to their own namespaces and nodes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.lab.apiserver import ApiServer
from tests.kube_fixtures import KubePlane, start_kube_plane


@pytest.fixture(scope="module")
def kube_plane(kube_crds: ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubePlane]:
    plane = start_kube_plane(kube_crds, tmp_path_factory.mktemp("kube-plane"))
    try:
        yield plane
    finally:
        plane.stop()
