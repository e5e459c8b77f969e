"""The redirect tests' lab: two nodes, two pods each, built and torn down per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.lab.plan import LabPlan
from tests.integration.redirect.redirect_lab import two_node_lab


@pytest.fixture
def lab(lab_prefix: str) -> Iterator[LabPlan]:
    with two_node_lab(lab_prefix) as plan:
        yield plan
