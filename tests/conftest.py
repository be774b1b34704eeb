"""Namespace tests need root. Locally they are skipped without it; in CI (CI=true) they must run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

# Properties of verdicts and tables, not of time: a loaded machine (CI, or tests running side by side on
# two cores) must not fail an example for taking longer than hypothesis's default 200 ms.
settings.register_profile("rusty-rail", deadline=None)
settings.load_profile("rusty-rail")

if TYPE_CHECKING:
    from tests.engine_netns import VethPair


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError("CI must run as root: namespace and XDP tests may not be skipped there")
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def veth() -> Iterator[VethPair]:
    """A veth pair between two fresh namespaces, removed afterwards, also when the test fails."""
    from tests.engine_netns import VethPair  # lazily: it needs pyroute2 and root

    pair = VethPair()
    try:
        yield pair
    finally:
        pair.close()
