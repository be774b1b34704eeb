"""The control plane's vocabulary: what is configured, and what the data plane is told.

Configuration (from a file or the environment) is `Config`; the control plane turns it, with health and
runtime changes (add, remove, drain, weight), into a `DataplaneState`: per service, the backends that
may receive flows and their weights. Engines only ever see `DataplaneState`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address
from typing import Protocol

from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import ServiceKey


class HealthType(str, Enum):
    TCP = "tcp"
    HTTP = "http"
    NONE = "none"


@dataclass(frozen=True)
class HealthSpec:
    type: HealthType = HealthType.NONE
    port: int = 0
    """0: the service's port."""
    path: str = "/"
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2


@dataclass(frozen=True)
class BackendSpec:
    address: IPv4Address
    weight: int = 1


@dataclass(frozen=True)
class ServiceSpec:
    key: ServiceKey
    backends: tuple[BackendSpec, ...]
    health: HealthSpec = HealthSpec()


@dataclass(frozen=True)
class Config:
    device: str
    engine: str = "auto"
    table_size: int = 65537
    control_socket: str | None = "/run/rusty-rail/control.sock"
    """None: no control socket (the environment form without RR_CONTROL_SOCKET)."""
    metrics: str | None = None
    """host:port of the Prometheus endpoint; None: off."""
    services: tuple[ServiceSpec, ...] = ()
    open_mode_backends: tuple[IPv4Address, ...] | None = None
    """The environment form (RR_TARGET_IPS): no services, every GRE packet balanced over these."""
    workers: int = 1
    connection_capacity: int | None = None
    """Entries the connection table holds at most (LRU beyond); None: the default, 1 << 20. Per worker
    process on the AF_PACKET engine."""


@dataclass(frozen=True)
class DataplaneState:
    """What the data plane serves. `services` None means open mode over `open_backends`."""

    services: Mapping[ServiceKey, Mapping[IPv4Address, int]] | None = None
    """service -> {backend: weight}; weight 0 = drained (keeps its flows, takes no new ones)."""
    open_backends: Mapping[IPv4Address, int] = field(default_factory=dict)


class Dataplane(Protocol):
    """What the control plane needs of an engine."""

    def apply(self, state: DataplaneState) -> None:
        """Make the engine serve `state`; established flows of backends still listed keep them."""

    def counters(self) -> dict[str, object]:
        """Summed over workers/CPUs: 'forwarded', 'passed', 'drop_<reason>', 'connections',
        'connection_evictions', 'table_rebuilds', and 'backends': {(service or None, backend): (packets, bytes)}.
        Optional: 'flows': {backend: connection entries naming it} (status shows it when present)."""

    def explain(self, key: FlowKey) -> tuple[IPv4Address | None, str]:
        """Where a flow would go now and why ('connection entry', 'table slot N', 'no service matches'),
        without changing any state."""
