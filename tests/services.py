"""Building core.service.Service objects for tests: a key and backends -> a Service with its table."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from rusty_rail.core.maglev import build_table
from rusty_rail.core.options import ENVIRONMENT_OPTIONS
from rusty_rail.core.service import Service, ServiceKey


def service(key: ServiceKey, backends: Iterable[str], size: int = 251, weights: Mapping[str, int] | None = None) -> Service:
    return Service(key, build_table(list(backends), size, weights))


def catch_all(backends: Iterable[str], size: int = 251, weights: Mapping[str, int] | None = None) -> Service:
    """The environment form's one service: every VIP, protocol and port, with its options."""
    return Service(ServiceKey.catch_all(), build_table(list(backends), size, weights), ENVIRONMENT_OPTIONS)
