"""Services: which inner packets a balancer serves, and the one rule that finds a packet's service.

A service is (VIP, protocol, port); protocol ANY and port 0 are wildcards, and a VIP of None is the
catch-all: every VIP. The environment form of the original (RR_TARGET_IPS) is exactly one catch-all
service, so after configuration there are only services.

`ServiceMatcher` is the rule (docs/WIRE.md section 10), written once: the balancer's decision, the
control plane's `explain` and the XDP map planner all use it. A packet is matched most specific first:

1. (VIP, port, protocol)
2. (VIP, any port, protocol)
3. (VIP, any port, any protocol)
4. a TCP/UDP key without ports (a fragment, WIRE.md section 5): the service of that VIP and protocol
   with the lowest port, so every balancer picks the same one
5. the catch-all service, if there is one

No match: NO_SERVICE. The matcher is a dictionary of lookup entries (`entries`):
`vip | port (2, network order) | protocol (1) | fragment flag (1)`, 8 bytes for an IPv4 VIP and 20 for an
IPv6 one: the same keys the XDP program looks up in rr_services and rr_services6, so the planner writes
exactly what this module matches on. A VIP matches flows of its own family (the key lengths differ); the
catch-all matches both.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from functools import total_ordering
from typing import Generic, TypeVar

from rusty_rail.core.address import Address, as_address, split_host_port, with_port
from rusty_rail.core.flow import FLOW_KEY_LEN
from rusty_rail.core.maglev import MaglevTable
from rusty_rail.core.options import ServiceOptions

T = TypeVar("T")
B = TypeVar("B")

CATCH_ALL_NAME = "*"
"""How the catch-all service is written (status, ctl, explain)."""
_CATCH_ALL_ALIASES = (CATCH_ALL_NAME, "open")  # "open": the name earlier releases gave the environment form
_PORTED = (b"\x06", b"\x11")  # TCP, UDP: the protocols whose keys carry ports
_NO_PORT = b"\x00\x00"


class ServiceProtocol(IntEnum):
    ANY = 0
    TCP = 6
    UDP = 17


@total_ordering
@dataclass(frozen=True)
class ServiceKey:
    vip: Address | None
    """None: every VIP (the catch-all); else an IPv4 or an IPv6 address."""
    protocol: ServiceProtocol = ServiceProtocol.ANY
    port: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port {self.port} out of range")
        if self.port and self.protocol == ServiceProtocol.ANY:
            raise ValueError("a port needs a protocol (tcp or udp)")
        if self.vip is None and (self.port or self.protocol != ServiceProtocol.ANY):
            raise ValueError("the catch-all service covers every protocol and port")

    @classmethod
    def catch_all(cls) -> ServiceKey:
        return cls(None)

    @property
    def is_catch_all(self) -> bool:
        return self.vip is None

    def entry(self, fragment: bool = False) -> bytes:
        """The lookup entry of this service (module docstring: 8 or 20 bytes); the catch-all has none."""
        if self.vip is None:
            raise ValueError("the catch-all service has no lookup entry")
        return lookup_entry(self.vip.packed, struct.pack("!H", self.port), self.protocol, fragment)

    def _order(self) -> tuple[int, int, int, int]:
        return (0, 0, 0, 0) if self.vip is None else (self.vip.version, int(self.vip), self.protocol, self.port)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, ServiceKey):
            return NotImplemented
        return self._order() < other._order()

    def __str__(self) -> str:
        if self.vip is None:
            return CATCH_ALL_NAME
        return f"{with_port(self.vip, self.port)}/{self.protocol.name.lower()}"

    @classmethod
    def parse(cls, text: str, protocol: str | None = None) -> ServiceKey:
        """'10.1.0.1:80' (+ 'tcp'), '10.1.0.1:80/udp', '10.1.0.1' (every port, any protocol), '*'; IPv6
        VIPs in brackets when a port follows: '[2001:db8::1]:443', '[2001:db8::1]:53/udp', '2001:db8::1'.

        Raises ValueError (or KeyError for an unknown protocol name) on anything else."""
        text = text.strip()
        if text in _CATCH_ALL_ALIASES:
            return cls.catch_all()
        proto_text = protocol
        if "/" in text:
            text, proto_text = text.split("/", 1)
        host, port_text = split_host_port(text)
        port = int(port_text) if port_text else 0
        if proto_text is None:
            proto = ServiceProtocol.TCP if port else ServiceProtocol.ANY
        else:
            proto = ServiceProtocol[proto_text.upper()]
        return cls(as_address(host), proto, port)


def lookup_entry(vip: bytes, port: bytes, protocol: int, fragment: bool = False) -> bytes:
    """vip | port | protocol | fragment flag: a key of `ServiceMatcher.entries` and of rr_services."""
    return vip + port + bytes((protocol, 1 if fragment else 0))


class ServiceMatcher(Generic[T]):
    """Finds the value (a pool, an index, a key) of the service a flow key belongs to."""

    def __init__(self, services: Mapping[ServiceKey, T]) -> None:
        entries: dict[bytes, T] = {}
        self.catch_all: T | None = None
        for key, value in services.items():
            if key.is_catch_all:
                self.catch_all = value
            else:
                entries[key.entry()] = value
        # Rule 4: per (VIP, protocol), the service with the lowest port; iterating highest port first
        # lets the lowest one write last.
        for key in sorted((k for k in services if not k.is_catch_all and k.protocol), key=lambda k: -k.port):
            assert key.vip is not None
            entries[lookup_entry(key.vip.packed, _NO_PORT, key.protocol, fragment=True)] = services[key]
        self.entries: dict[bytes, T] = entries
        """Every lookup entry (8 or 20 bytes, module docstring) -> value; the catch-all is not among them."""
        self.named6 = sum(1 for k in services if k.vip is not None and k.vip.version == 6)
        """Services with an IPv6 VIP: with none, an IPv6 flow goes to the catch-all without a lookup."""
        self.named4 = len(services) - self.named6 - (1 if self.catch_all is not None else 0)
        """Services with an IPv4 VIP: with none, an IPv4 flow goes to the catch-all without a lookup."""
        self.named = self.named4 + self.named6
        """Services with a VIP."""

    def match(self, key: bytes) -> T | None:
        """The value for a flow key of either family (core/flow.py), by the rule in the module docstring.
        Hot path: constant slices; the ports are bytes -8..-4 of a key of either length."""
        if len(key) == FLOW_KEY_LEN:
            if not self.named4:
                return self.catch_all
            vip, port, proto = key[4:8], key[10:12], key[12:13]
        else:
            if not self.named6:
                return self.catch_all
            vip, port, proto = key[16:32], key[34:36], key[36:37]
        get = self.entries.get
        found = (get(vip + port + proto + b"\x00") or get(vip + _NO_PORT + proto + b"\x00")
                 or get(vip + b"\x00\x00\x00\x00"))
        if found is None and proto in _PORTED and key[-8:-4] == b"\x00\x00\x00\x00":
            found = get(vip + _NO_PORT + proto + b"\x01")
        if found is not None:
            return found
        return self.catch_all

    def tally(self, entries: Iterable[tuple[bytes, B]]) -> dict[tuple[T, B], int]:
        """Connection entries (flow key of either family, backend) counted per (value of the key's
        service, backend), by match(); entries whose key matches no service are left out.

        match() reads only the key's length, the VIP, the destination port, the protocol and whether
        both ports are 0, so keys are grouped by those first and the rule runs once per group, not once
        per entry."""
        if not self.named:
            if self.catch_all is None:
                return {}
            return {(self.catch_all, b): n for b, n in Counter(b for _, b in entries).items()}
        groups = Counter((_match_group(bytes(k)), b) for k, b in entries)
        out: dict[tuple[T, B], int] = {}
        for (group, backend), n in groups.items():
            value = self.match(group)
            if value is not None:
                out[(value, backend)] = out.get((value, backend), 0) + n
        return out


def _match_group(key: bytes) -> bytes:
    """A key of the same length that match() treats as `key`: the source address zeroed and a non-zero
    source port standing for any (both ports 0 stay 0: port-less)."""
    at = len(key) - 8  # the ports: bytes -8..-4 of a key of either length
    sport = b"\x00\x00" if key[at:at + 4] == b"\x00\x00\x00\x00" else b"\xff\xff"
    half = at // 2     # the source address is the first half of what precedes the ports
    return bytes(half) + key[half:at] + sport + key[at + 2:]


@dataclass(frozen=True)
class Service:
    """What a data plane serves for one service: its key, its Maglev table (built by the control
    plane; data planes never build tables) and its options (core/options.py). The table lists every
    backend that keeps its established flows, drained ones (weight 0, no slots) included."""

    key: ServiceKey
    table: MaglevTable
    options: ServiceOptions = ServiceOptions()

    @property
    def backends(self) -> tuple[Address, ...]:
        return self.table.backends


@dataclass
class Pool:
    """One service as a data plane holds it: its table resolved to addresses, and what went to each."""

    service: Service
    backend_set: frozenset[int]
    """Every listed backend (as int: core/address.py), drained ones included: their established flows stay."""
    slot_backend: list[int]
    """Slot -> backend address: the table resolved once, so a packet costs one list index."""
    packets: dict[int, int] = field(default_factory=dict)
    bytes: dict[int, int] = field(default_factory=dict)
    plain: bool = True
    """The service's options leave a TCP/UDP decision as the default one (ServiceOptions.plain): the
    decision's shortest path, and the only pools the AF_PACKET engine's array path serves."""
    answer_ping: bool = True
    server_backend: dict[int, int] = field(default_factory=dict)
    """QUIC server ID -> backend, for the listed backends that have one."""

    @classmethod
    def of(cls, service: Service, previous: Pool | None = None) -> Pool:
        """A pool for `service`; figures carry over from `previous` for backends still listed."""
        addresses = [int(b) for b in service.table.backends]
        indices = service.table.slots
        slots = [addresses[i] for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        options = service.options
        listed = frozenset(addresses)
        servers = {sid: b for sid, b in options.server_backends().items() if b in listed} if options.quic else {}
        pool = cls(service, listed, slots, plain=options.plain, answer_ping=options.answer_ping, server_backend=servers)
        for backend in addresses:
            pool.packets[backend] = previous.packets.get(backend, 0) if previous else 0
            pool.bytes[backend] = previous.bytes.get(backend, 0) if previous else 0
        return pool


def services_by_key(services: Iterable[Service]) -> dict[ServiceKey, Service]:
    return {s.key: s for s in services}
