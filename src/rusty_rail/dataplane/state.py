"""What the control plane wants a data plane to serve: services with their finished Maglev tables and
their options.

Tables are built here, for the control plane, and nowhere else: an engine receives a `DataplaneState`
and only copies it (into a Balancer, or into BPF maps). `StateBuilder` rebuilds only the tables of
services whose backends or weights changed, so a drain in one service does not cost every other
service a table build; an options change alone builds none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from rusty_rail.core.address import Address, canonical_key
from rusty_rail.core.constants import DEFAULT_TABLE_SIZE
from rusty_rail.core.maglev import build_table
from rusty_rail.core.options import ServiceOptions
from rusty_rail.core.service import Service, ServiceKey

Weights = Mapping[Address, int]
"""backend -> weight; 0 = drained (keeps its established flows, takes no new ones)."""


@dataclass(frozen=True)
class DataplaneState:
    """Every service the data plane serves, and nothing else (a packet of no service: NO_SERVICE)."""

    services: tuple[Service, ...] = ()
    """In canonical (ServiceKey) order."""
    table_size: int = DEFAULT_TABLE_SIZE
    """The size of every table in `services` (prime): what an engine sizes its table storage by."""
    generation: int = 0
    """Counts the states a builder made; equal states may carry different generations."""

    def by_key(self) -> dict[ServiceKey, Service]:
        return {s.key: s for s in self.services}

    def same_services(self, other: DataplaneState) -> bool:
        return self.services == other.services


@dataclass
class StateBuilder:
    """Turns wanted weights (and options) per service into a `DataplaneState`, reusing unchanged tables."""

    table_size: int = DEFAULT_TABLE_SIZE
    tables_built: int = 0
    """Maglev tables built so far (status: table_rebuilds)."""
    _cache: dict[ServiceKey, tuple[tuple[tuple[Address, int], ...], Service]] = field(default_factory=dict)
    _generation: int = 0

    def build(self, wanted: Mapping[ServiceKey, Weights],
              options: Mapping[ServiceKey, ServiceOptions] | None = None) -> DataplaneState:
        """The state serving `wanted`, each service with its `options` (absent: the defaults)."""
        services = []
        cache: dict[ServiceKey, tuple[tuple[tuple[Address, int], ...], Service]] = {}
        for key in sorted(wanted):
            weights = tuple(sorted(wanted[key].items(), key=lambda item: canonical_key(item[0])))
            cached = self._cache.get(key)
            wanted_options = (options or {}).get(key, ServiceOptions())
            if cached is not None and cached[0] == weights:
                service = cached[1]
                if service.options != wanted_options:
                    service = Service(key, service.table, wanted_options)
            else:
                service = Service(key, build_table([b for b, _ in weights], self.table_size, dict(weights)), wanted_options)
                self.tables_built += 1
            cache[key] = (weights, service)
            services.append(service)
        self._cache = cache
        self._generation += 1
        return DataplaneState(tuple(services), self.table_size, self._generation)
