"""Fixtures for the native engine tests (helpers live in engine_testkit)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from engine_testkit import Events, Pki, make_pki

from native.engine import Engine


@pytest.fixture(scope="session")
def pki() -> Pki:
    return make_pki()


@pytest.fixture(params=[1, 2], ids=["1-loop", "2-loops"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """With 2 loops, the client and server ends of a tunnel live on different threads."""
    eng = Engine(threads=request.param)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture
def events(engine: Engine) -> Events:
    return Events(engine)
