"""Services: which inner packets a balancer serves, and the backend pool of each.

A service is (VIP, protocol, port); protocol ANY and port 0 are wildcards. A packet is matched most
specific first: (port, protocol), (any port, protocol), (any port, any protocol). A port always
comes with a protocol.
A TCP/UDP fragment has no ports in its key (docs/WIRE.md section 5), so it goes to the service of that
VIP and protocol with the lowest port: deterministic, so every balancer agrees.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address

from rusty_rail.core.maglev import BackendLike, MaglevTable, build_table


class ServiceProtocol(IntEnum):
    ANY = 0
    TCP = 6
    UDP = 17


@dataclass(frozen=True, order=True)
class ServiceKey:
    vip: IPv4Address
    protocol: ServiceProtocol = ServiceProtocol.ANY
    port: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port {self.port} out of range")
        if self.port and self.protocol == ServiceProtocol.ANY:
            raise ValueError("a port needs a protocol (tcp or udp)")

    @property
    def match_key(self) -> bytes:
        """vip | port | protocol, the bytes the decision slices from a flow key to find its service."""
        return self.vip.packed + struct.pack("!HB", self.port, self.protocol)

    def __str__(self) -> str:
        return f"{self.vip}:{self.port}/{self.protocol.name.lower()}"

    @classmethod
    def parse(cls, text: str, protocol: str | None = None) -> ServiceKey:
        """'10.1.0.1:80' (+ 'tcp'), '10.1.0.1:80/udp', '10.1.0.1' (every port, any protocol)."""
        proto_text = protocol
        if "/" in text:
            text, proto_text = text.split("/", 1)
        host, _, port_text = text.partition(":")
        port = int(port_text) if port_text else 0
        if proto_text is None:
            proto = ServiceProtocol.TCP if port else ServiceProtocol.ANY
        else:
            proto = ServiceProtocol[proto_text.upper()]
        return cls(IPv4Address(host), proto, port)


@dataclass
class Pool:
    """The backends of one service, their Maglev table, and what went to each."""

    table: MaglevTable
    backend_set: frozenset[int]
    """Every listed backend, drained ones (weight 0) included: their established flows stay."""
    slot_backend: list[int]
    """Slot -> backend address: the table resolved once, so a packet costs one list index."""
    packets: dict[int, int] = field(default_factory=dict)
    bytes: dict[int, int] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        backends: Iterable[BackendLike],
        size: int,
        weights: Mapping[BackendLike, int] | Sequence[int] | None = None,
        previous: Pool | None = None,
    ) -> Pool:
        table = build_table(backends, size, weights)
        addresses = [int(b) for b in table.backends]
        pool = cls(table, frozenset(addresses), [addresses[i] for i in table.slots])
        for backend in addresses:
            pool.packets[backend] = previous.packets.get(backend, 0) if previous else 0
            pool.bytes[backend] = previous.bytes.get(backend, 0) if previous else 0
        return pool
