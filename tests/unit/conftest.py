"""The unit layer has no broker and starts no shardsup process: the fixtures of
tests/conftest.py that would give it one are replaced here by ones that fail the test,
so a test that needs them is noticed and goes to tests/integration/."""
from __future__ import annotations

import pytest


def _no_broker(name: str) -> None:
    pytest.fail(f"unit tests have no broker: {name!r} is for tests/integration/", pytrace=False)


@pytest.fixture
def broker() -> None:
    _no_broker("broker")


@pytest.fixture
def own_broker() -> None:
    _no_broker("own_broker")


@pytest.fixture
def start_supervisor() -> None:
    _no_broker("start_supervisor")
