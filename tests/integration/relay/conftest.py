"""Fixtures of the relay integration tests: one CA per module, a fresh plane (real gRPC + mTLS) per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mgmt.ca import CertificateAuthority
from tests.relay_fixtures import TD, Plane, start_plane, write_mesh


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate_root(TD)


@pytest.fixture
def plane(tmp_path: Path, ca: CertificateAuthority) -> Iterator[Plane]:
    write_mesh(tmp_path / "config")
    p = start_plane(tmp_path / "config", tmp_path / "state", ca)
    yield p
    p.stop()
