"""The balancer's decision: an Ethernet frame in, a verdict out (docs/WIRE.md is the contract).

Sans-I/O and clock-free: the engine passes `now` and the next-hop MACs it learnt from the kernel, and
acts on the verdict. The codecs in ipv4.py and gre.py describe the same formats for tests and tools;
decide() reads the bytes by offset instead, because it runs once per packet and dataclasses would cost
more than the rest of the work together.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address
from types import MappingProxyType

from rusty_rail.core.checksum import ones_complement_sum
from rusty_rail.core.conntrack import ConnectionTable
from rusty_rail.core.flow import FlowKey, inner_flow_key
from rusty_rail.core.constants import RR_HASH_SEED
from rusty_rail.core.flowhash import flow_hash
from rusty_rail.core.maglev import BackendLike
from rusty_rail.core.service import Pool, Service, ServiceKey, ServiceMatcher
from rusty_rail.core.verdict import PASS, Drop, DropReason, Forward, Verdict

_GRE = 47
_OUT_TTL = 64
_OUT_DF = 0x4000
_GRE_OUT = b"\x00\x00\x08\x00"
_IP_FIXED = struct.Struct("!BBHHHBBH")
_DROPS = {reason: Drop(reason) for reason in DropReason}


def _as_int(address: BackendLike) -> int:
    return int(IPv4Address(address))


class Balancer:
    """One balancer's data-plane state: its services (tables built by the control plane), the
    connection table, next-hop MACs. A packet that matches no service is dropped as NO_SERVICE, so the
    balancer is never an open relay; the environment form is one catch-all service (core/service.py).
    """

    def __init__(
        self,
        local_address: BackendLike,
        local_mac: bytes,
        services: Iterable[Service] = (),
        connections: ConnectionTable | None = None,
        hash_seed: int = RR_HASH_SEED,
    ) -> None:
        if len(local_mac) != 6:
            raise ValueError("local_mac must be 6 bytes")
        self.local_address = IPv4Address(local_address)
        self.local_mac = bytes(local_mac)
        self.hash_seed = hash_seed
        self.connections = connections if connections is not None else ConnectionTable()
        self._macs: dict[int, bytes] = {}
        self._prefixes: dict[int, tuple[bytes, bytes, int]] = {}
        self.forwarded = 0
        self.passed = 0
        self.drops = [0] * (max(DropReason) + 1)
        self._pools: dict[ServiceKey, Pool] = {}
        self._matcher: ServiceMatcher[Pool] = ServiceMatcher({})
        self._all_backends: frozenset[int] = frozenset()
        self.set_services(services)

    # -- control ----------------------------------------------------------------------------------

    def set_services(self, services: Iterable[Service]) -> None:
        """Serve exactly `services`. A service whose table did not change keeps its pool (and figures);
        flows of backends a service still lists keep their backend.

        Safe while another thread runs decide(): the new pools and matcher are built completely, then
        swapped in with plain attribute assignments (atomic under the GIL), so decide() sees the old
        services or the new ones, never half of them."""
        pools: dict[ServiceKey, Pool] = {}
        for service in services:
            old = self._pools.get(service.key)
            pools[service.key] = old if old is not None and old.service == service else Pool.of(service, old)
        backends = frozenset().union(*(p.backend_set for p in pools.values())) if pools else frozenset()
        matcher = ServiceMatcher(pools)
        self._pools, self._matcher, self._all_backends = pools, matcher, backends

    @property
    def services(self) -> dict[ServiceKey, Pool]:
        return dict(self._pools)

    @property
    def backends(self) -> frozenset[int]:
        """Every backend of every service (the engines resolve their next hops)."""
        return self._all_backends

    @property
    def neighbours(self) -> Mapping[int, bytes]:
        """Backend -> the MAC of its next hop, for those known now: a read-only live view, for engines
        that build output frames in bulk (docs/WIRE.md section 8)."""
        return MappingProxyType(self._macs)

    def pool_for(self, key: bytes) -> Pool | None:
        """The pool of the service a flow key belongs to (the rule: core/service.py)."""
        return self._matcher.match(key)

    def set_neighbour(self, backend: BackendLike, mac: bytes | None) -> None:
        """The Ethernet address of `backend`'s next hop, or None while it is unknown."""
        backend = _as_int(backend)
        if mac is None:
            self._macs.pop(backend, None)
            self._prefixes.pop(backend, None)
            return
        if len(mac) != 6:
            raise ValueError("mac must be 6 bytes")
        self._macs[backend] = bytes(mac)
        self._prefixes[backend] = self._output_prefix(backend, bytes(mac))

    def neighbour(self, backend: BackendLike) -> bytes | None:
        return self._macs.get(_as_int(backend))

    def _output_prefix(self, backend: int, mac: bytes) -> tuple[bytes, bytes, int]:
        """Per backend: the Ethernet header, the addresses, and the checksum sum of the fixed IP fields."""
        src = self.local_address.packed
        dst = backend.to_bytes(4, "big")
        fixed = ones_complement_sum(_IP_FIXED.pack(0, 0, 0, 0, _OUT_DF, _OUT_TTL, _GRE, 0) + src + dst)
        return mac + self.local_mac + b"\x08\x00", src + dst, fixed

    # -- data plane -------------------------------------------------------------------------------

    def _drop(self, reason: DropReason) -> Drop:
        self.drops[reason] += 1
        return _DROPS[reason]

    def count_drop(self, reason: DropReason) -> None:
        """Count a drop the engine made after the decision (e.g. TX_FAILED)."""
        self.drops[reason] += 1

    def decide(self, frame: bytes, now: float) -> Verdict:
        """The verdict for one Ethernet frame (docs/WIRE.md sections 1-8). Hot path."""
        n = len(frame)
        if n < 34 or frame[12] != 0x08 or frame[13] != 0x00 or frame[14] >> 4 != 4 or frame[23] != _GRE:
            self.passed += 1
            return PASS
        ihl = frame[14] & 0x0F
        if ihl != 5:
            return self._drop(DropReason.OUTER_BAD_IHL if ihl < 5 else DropReason.OUTER_OPTIONS)
        total = (frame[16] << 8) | frame[17]
        if total < 20 or total > n - 14:
            return self._drop(DropReason.OUTER_BAD_LENGTH)
        if ones_complement_sum(frame[14:34]) != 0xFFFF:
            return self._drop(DropReason.OUTER_BAD_CHECKSUM)
        if ((frame[20] << 8) | frame[21]) & 0x3FFF:
            return self._drop(DropReason.OUTER_FRAGMENT)

        end = 14 + total
        if end - 34 < 4:
            return self._drop(DropReason.GRE_TRUNCATED)
        flags = (frame[34] << 8) | frame[35]
        if flags & 0x0007:
            return self._drop(DropReason.GRE_VERSION)
        if flags & 0x4C00:
            return self._drop(DropReason.GRE_RESERVED)
        gre_len = 4 + 4 * (((flags >> 15) & 1) + ((flags >> 13) & 1) + ((flags >> 12) & 1))
        if end - 34 < gre_len:
            return self._drop(DropReason.GRE_TRUNCATED)
        if flags & 0x8000 and ones_complement_sum(frame[34:end]) != 0xFFFF:
            return self._drop(DropReason.GRE_CHECKSUM)
        if frame[36] != 0x08 or frame[37] != 0x00:
            return self._drop(DropReason.GRE_PROTOCOL)

        inner = frame[34 + gre_len : end]
        size = len(inner)
        if size < 20:
            return self._drop(DropReason.INNER_TRUNCATED)
        if inner[0] >> 4 != 4:
            return self._drop(DropReason.INNER_VERSION)
        inner_ihl = (inner[0] & 0x0F) * 4
        if inner_ihl < 20:
            return self._drop(DropReason.INNER_BAD_IHL)
        inner_total = (inner[2] << 8) | inner[3]
        if inner_total < inner_ihl or inner_total > size:
            return self._drop(DropReason.INNER_BAD_LENGTH)
        if inner_total < size:
            inner = inner[:inner_total]
        key = inner_flow_key(inner, inner_ihl)
        if key is None:
            return self._drop(DropReason.INNER_TRUNCATED)

        pool = self._matcher.match(key)
        if pool is None:
            return self._drop(DropReason.NO_SERVICE)
        backend = self.connections.lookup(key, now)
        if backend is None or backend not in pool.backend_set:
            slots = pool.slot_backend
            if not slots:
                return self._drop(DropReason.NO_BACKEND)
            backend = slots[flow_hash(key, self.hash_seed) % len(slots)]
            self.connections.insert(key, backend, now)
        prefix = self._prefixes.get(backend)
        if prefix is None:
            self.drops[DropReason.NO_NEIGHBOUR] += 1
            return Drop(DropReason.NO_NEIGHBOUR, backend)

        ethernet, addresses, fixed_sum = prefix
        tos = inner[1]
        out_total = 24 + inner_total
        s = fixed_sum + ((0x45 << 8) | tos) + out_total
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        header = _IP_FIXED.pack(0x45, tos, out_total, 0, _OUT_DF, _OUT_TTL, _GRE, ~s & 0xFFFF)
        self.forwarded += 1
        pool.packets[backend] += 1
        pool.bytes[backend] += inner_total
        return Forward(ethernet + header + addresses + _GRE_OUT + inner, backend)

    # -- inspection -------------------------------------------------------------------------------

    def explain(self, key: FlowKey, now: float) -> tuple[IPv4Address | None, str]:
        """Where a flow goes and why: ('connection entry' or 'table slot N'), without changing state."""
        packed = key.packed
        pool = self.pool_for(packed)
        return explain_choice(None if pool is None else pool.service, packed, self.connections.peek(packed, now),
                              self.hash_seed)

    def counters(self) -> dict[str, int]:
        out = {"forwarded": self.forwarded, "passed": self.passed}
        for reason in DropReason:
            out[f"drop_{reason.name.lower()}"] = self.drops[reason]
        out["connections"] = len(self.connections)
        out["connection_evictions"] = self.connections.evictions
        return out

    def backend_figures(self) -> dict[tuple[ServiceKey, IPv4Address], tuple[int, int]]:
        """(packets, inner bytes) forwarded per (service, backend) listed now."""
        return {(key, IPv4Address(address)): (packets, pool.bytes.get(address, 0))
                for key, pool in self._pools.items() for address, packets in dict(pool.packets).items()}


def explain_choice(service: Service | None, key: bytes, remembered: int | None,
                   hash_seed: int = RR_HASH_SEED) -> tuple[IPv4Address | None, str]:
    """docs/WIRE.md section 7 as an answer for people: the backend a flow with this key goes to and why,
    given its service (None: none matched) and the backend its connection entry names (None: no entry).
    The one statement of the rule for `explain`, whatever engine holds the connection table."""
    if service is None:
        return None, "no service matches"
    backends = service.table.backends
    if remembered is not None and any(int(b) == remembered for b in backends):
        return IPv4Address(remembered), "connection entry"
    slots = service.table.slots
    if not len(slots):
        return None, "no backends"
    slot = flow_hash(key, hash_seed) % len(slots)
    return backends[int(slots[slot])], f"table slot {slot}"
