"""Namespace tests need root. Locally they are skipped without it; in CI (CI=true) they must run."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError("CI must run as root: namespace and XDP tests may not be skipped there")
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)
