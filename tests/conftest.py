"""Shared fixtures. Tests marked `root` need root and network namespaces; they run here and in CI."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lab_prefix(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A unique lab prefix and state dir, so concurrent tests and a developer's own lab never clash."""
    prefix = "t" + uuid.uuid4().hex[:4] + "-"
    monkeypatch.setenv("AMBIT_LAB_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("AMBIT_LAB_PREFIX", prefix)
    yield prefix
