"""What the XDP program's maps must hold, as a pure function: `plan(desired, image) -> (writes, image)`.

No libbpf and no I/O: `desired` is the state the control plane wants (services with their finished
Maglev tables) plus what the engine learnt (next-hop MACs, the device's address and MAC); `image` is
what the maps hold now; the answer is the writes that take them there, in an order that is safe while
the program runs, and the image after them. `XdpProgram.sync` executes the writes.

The order (every step only names what an earlier step wrote):

1. rr_backends: new backends, and next-hop MACs that changed. A backend keeps its index for as long as
   any service lists its address, because connection entries name their backend by index + address.
2. Service indices for new services. When every index is taken, some by services that are leaving,
   those are first removed from rr_services (and the config) and only then freed.
3. rr_backend_stats: the slots of (service index, backend index) pairs that start naming a
   (service, address) they did not name before are zeroed, so a backend's figures start from zero
   when it joins or rejoins a service, and a reused index never inherits another's counts.
4. rr_members (old | new while a service changes) and rr_maglev tables.
5. rr_config (the catch-all and its options, the named-service counts, the ICMP limit), then rr_services
   and rr_services6: the keys of core/service.py's `ServiceMatcher.entries` (the one statement of the
   match rule; 8-byte entries go to rr_services, 20-byte ones to rr_services6) with each service's index,
   table size and options (`option_flags`), removed entries last; then rr_quic (QUIC server IDs of the
   backends listed in services with quic = true), removed entries last. If anything naming a service
   changed, rr_config again with services_gen bumped: no connection entry's service stamp (rr_structs.h
   rr_conn) stands any more. Generations are CLOCK_MONOTONIC ns (or the last + 1): a handover's successor
   never issues one its predecessor's adopted entries carry.
6. rr_members down to the new members.
7. Services that left: members cleared, index freed (rr_services stopped naming them in step 5).
8. Backends no longer listed anywhere: marked unused, index freed (a later plan may reuse it).

A write is (map name, key bytes, value bytes or None for a delete). For array maps the key may hold
several consecutive keys and the value as many values: one batch. Values of per-CPU maps are given once,
for every CPU. Values are in the host's byte order, as the kernel reads them.
"""

from __future__ import annotations

import ctypes
import heapq
import time
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, NamedTuple

from rusty_rail.core.address import as_address, is_ipv6
from rusty_rail.core.conntrack import Timeouts
from rusty_rail.core.constants import DEFAULT_MTU, RR_HASH_SEED
from rusty_rail.core.maglev import MaglevTable
from rusty_rail.core.options import IcmpLimit, ServiceOptions
from rusty_rail.core.service import Service, ServiceKey, ServiceMatcher
from rusty_rail.dataplane.state import DataplaneState
from rusty_rail.engines.xdp import maps as m

if TYPE_CHECKING:
    from rusty_rail.core.balancer import Balancer

__all__ = ["BackendEntry", "ConfigImage", "Desired", "IndexAllocator", "MapImage", "TableImage", "Write",
           "adopt", "cache_families", "option_flags", "plan"]

_NS = 1_000_000_000


class Write(NamedTuple):
    map: str
    key: bytes
    """One key, or (array maps) several consecutive keys: a batch."""
    value: bytes | None
    """As many values as keys; None: delete the key."""


class IndexAllocator:
    """Indices 0 .. limit-1, the lowest free one first. Backend indices and service indices alike."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self._next = 0             # every index from here on has never been taken
        self._free: list[int] = []  # a heap of freed indices below _next

    def allocate(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        if self._next >= self.limit:
            raise ValueError(f"more than {self.limit} {self.what}")
        self._next += 1
        return self._next - 1

    def take(self, index: int) -> None:
        """Mark `index` taken (a handover's backend indices)."""
        if not 0 <= index < self.limit:
            raise ValueError(f"{self.what} index {index} out of range")
        if index >= self._next:
            for i in range(self._next, index):
                heapq.heappush(self._free, i)
            self._next = index + 1
        elif index in self._free:
            self._free.remove(index)
            heapq.heapify(self._free)
        else:
            raise ValueError(f"{self.what} index {index} is taken")

    def free(self, index: int) -> None:
        heapq.heappush(self._free, index)

    @property
    def available(self) -> int:
        return self.limit - len(self)

    def __len__(self) -> int:
        return self._next - len(self._free)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IndexAllocator):
            return NotImplemented
        return (self.limit, self._next, sorted(self._free)) == (other.limit, other._next, sorted(other._free))

    def __repr__(self) -> str:
        return f"IndexAllocator({self.what}: {len(self)} of {self.limit} taken)"

    def copy(self) -> IndexAllocator:
        other = IndexAllocator(self.limit, self.what)
        other._next, other._free = self._next, list(self._free)
        return other


@dataclass(frozen=True)
class Desired:
    """What the maps must make the program do."""

    state: DataplaneState
    local_address: IPv4Address | None
    """The device's first IPv4 address: the outer source toward IPv4 backends (None: it has none)."""
    local_mac: bytes
    macs: Mapping[int, bytes] = field(default_factory=dict)
    """Backend (as int) -> its next hop's MAC; absent (or None): unknown, NO_NEIGHBOUR."""
    hash_seed: int = RR_HASH_SEED
    timeouts: Timeouts = Timeouts()
    local_address6: IPv6Address | None = None
    """The device's first global IPv6 address: the outer source toward IPv6 backends (None: none)."""
    mtu: int = DEFAULT_MTU
    """The device's MTU: a longer output is answered or dropped (docs/WIRE.md section 8b)."""
    mtus: Mapping[int, int] = field(default_factory=dict)
    """Backend (as int) -> the MTU its route sets, for those whose route sets one (capped by `mtu`)."""
    icmp_limit: IcmpLimit = IcmpLimit()
    """How many "too big" answers each CPU may send (rr_icmp_bucket)."""

    def backend_mtu(self, backend: int) -> int:
        route = self.mtus.get(backend)
        return self.mtu if route is None else min(route, self.mtu)

    @classmethod
    def mirror(cls, balancer: Balancer, table_size: int | None = None) -> Desired:
        """The maps that make the program decide as `balancer` (a core.balancer.Balancer) does: its
        services, neighbours, addresses, MTU, seed and timeouts (tests, benchmarks, the fuzz target)."""
        services = tuple(pool.service for _, pool in sorted(balancer.services.items()))
        size = table_size or max((len(s.table.slots) for s in services), default=0) or DataplaneState().table_size
        macs = {b: balancer.neighbour(b) for b in balancer.backends if balancer.neighbour(b) is not None}
        return cls(DataplaneState(services, size), balancer.local_address, balancer.local_mac, macs,
                   balancer.hash_seed, balancer.connections.timeouts, balancer.local_address6, balancer.mtu,
                   dict(balancer.route_mtus), balancer.icmp_limit)


@dataclass(frozen=True)
class ConfigImage:
    """rr_config[0] (bpf/rr_structs.h)."""

    local_address: IPv4Address | None
    local_mac: bytes
    hash_seed: int
    named_services: int
    """Services with an IPv4 VIP."""
    catch_all: int
    """0: none; else 1 + the catch-all's service index."""
    catch_all_size: int
    table_stride: int
    timeouts_ns: tuple[int, int, int]
    local_address6: IPv6Address | None = None
    named_services6: int = 0
    """Services with an IPv6 VIP."""
    catch_all_flags: int = 0
    """The catch-all's options (option_flags)."""
    icmp_limit: IcmpLimit = IcmpLimit()
    services_gen: int = 0
    """Bumped after every change of what names the services (module docstring, step 5)."""
    cache_services: int = 0
    """CACHE_SERVICES4 / CACHE_SERVICES6 (cache_families)."""

    def value(self) -> bytes:
        c = m.RrConfig()
        if self.local_address is not None:
            c.local_addr = (ctypes.c_uint8 * 4)(*self.local_address.packed)
        if self.local_address6 is not None:
            c.local_addr6 = (ctypes.c_uint8 * 16)(*self.local_address6.packed)
        c.local_mac = (ctypes.c_uint8 * 6)(*self.local_mac)
        c.hash_seed = self.hash_seed & 0xFFFFFFFF
        c.named_services, c.catch_all, c.catch_all_size = self.named_services, self.catch_all, self.catch_all_size
        c.named_services6, c.catch_all_flags = self.named_services6, self.catch_all_flags
        c.icmp_period_ns, c.icmp_capacity_ns = self.icmp_limit.period_ns, self.icmp_limit.capacity_ns
        c.table_stride = self.table_stride
        c.conn_timeout_ns = (ctypes.c_uint64 * 3)(*self.timeouts_ns)
        c.services_gen, c.cache_services = self.services_gen, self.cache_services
        return bytes(c)

    def naming(self) -> tuple[int, ...]:
        """The fields that decide a flow's service (with rr_services): a change bumps services_gen."""
        return (self.named_services, self.named_services6, self.catch_all, self.catch_all_size, self.catch_all_flags,
                self.cache_services)


@dataclass(frozen=True)
class BackendEntry:
    """rr_backends[index] while in use."""

    address: int
    mac: bytes | None
    mtu: int = DEFAULT_MTU
    """The largest IP packet toward it (docs/WIRE.md section 8b)."""


@dataclass(frozen=True)
class TableImage:
    """A service's rr_maglev table as written."""

    table: MaglevTable
    """The table it was written from (the same object again skips the work)."""
    indices: tuple[int, ...]
    """The backend index of each of table.backends."""
    slots: bytes
    """The slots as written: packed u32 backend indices."""

    @property
    def size(self) -> int:
        return len(self.slots) // 4


@dataclass
class MapImage:
    """What the maps hold (and which indices are taken). Plans copy it; nothing changes one in place."""

    table_stride: int
    """rr_maglev entries per service: the largest table the loaded maps take."""
    max_services: int
    config: ConfigImage | None = None
    backend_index: dict[int, int] = field(default_factory=dict)
    """Backend address (int) -> its rr_backends index, a handover's adopted ones included."""
    backends: dict[int, BackendEntry] = field(default_factory=dict)
    """rr_backends index -> the entry written there, for entries in use."""
    backend_indices: IndexAllocator = field(default_factory=lambda: IndexAllocator(m.MAX_BACKENDS, "backends"))
    service_index: dict[ServiceKey, int] = field(default_factory=dict)
    service_indices: IndexAllocator | None = None
    services: dict[bytes, tuple[int, int, int]] = field(default_factory=dict)
    """rr_services and rr_services6: lookup entry (8 or 20 bytes) -> (service index, table size, flags)."""
    quic: dict[int, int] = field(default_factory=dict)
    """rr_quic: RR_QUIC_KEY(service index, server ID) -> backend index."""
    tables: dict[int, TableImage] = field(default_factory=dict)
    members: dict[int, frozenset[int]] = field(default_factory=dict)
    """Service index -> the backend indices set in its rr_members bitmap."""
    stat_slots: dict[tuple[int, int], tuple[ServiceKey, int]] = field(default_factory=dict)
    """(service index, backend index) -> (service, backend address): the rr_backend_stats slots in
    use, and whose figures they hold."""

    def __post_init__(self) -> None:
        if self.service_indices is None:
            self.service_indices = IndexAllocator(self.max_services, "services (max_services)")

    def copy(self) -> MapImage:
        assert self.service_indices is not None
        return replace(self, backend_index=dict(self.backend_index), backends=dict(self.backends),
                       backend_indices=self.backend_indices.copy(), service_index=dict(self.service_index),
                       service_indices=self.service_indices.copy(), services=dict(self.services), quic=dict(self.quic),
                       tables=dict(self.tables), members=dict(self.members), stat_slots=dict(self.stat_slots))

    def table_of(self, key: ServiceKey) -> TableImage | None:
        index = self.service_index.get(key)
        return None if index is None else self.tables.get(index)


def adopt(image: MapImage, backends: Mapping[int, int]) -> MapImage:
    """`image` with a handover predecessor's backend indices ({index: address}) taken by the same
    addresses, so the connection entries it wrote (index + address) stay valid. Before the first plan:
    the entries themselves are written by the plan, for the addresses still wanted."""
    new = image.copy()
    for index, address in sorted(backends.items()):
        if address in new.backend_index:
            continue  # the same address twice: the first index names it
        new.backend_indices.take(index)
        new.backend_index[address] = index
    return new


def plan(desired: Desired, image: MapImage,
         clock: Callable[[], int] = time.monotonic_ns) -> tuple[list[Write], MapImage]:
    """The writes that make the maps of `image` hold `desired`, in a safe order (module docstring), and
    the image after them. Raises ValueError (and writes nothing) when the maps cannot hold it. `clock`
    gives the services generations (CLOCK_MONOTONIC ns)."""
    services = desired.state.services
    if len(services) > image.max_services:
        raise ValueError(f"{len(services)} services: more than max_services = {image.max_services}")
    for service in services:
        if len(service.table.slots) > image.table_stride:
            raise ValueError(f"the table of {service.key} has {len(service.table.slots)} slots: more than the "
                             f"{image.table_stride} the maps were sized for")
    listed = {s.key: [int(b) for b in s.backends] for s in services}
    wanted = sorted(set().union(*listed.values())) if listed else []
    for address in wanted:
        family, local = (6, desired.local_address6) if is_ipv6(address) else (4, desired.local_address)
        if local is None:
            raise ValueError(f"backend {as_address(address)} is IPv{family} but the device has no "
                             f"{'global IPv6' if family == 6 else 'IPv4'} address")
    new, writes = image.copy(), []

    # 1. backends
    for address in wanted:
        index = new.backend_index.get(address)
        if index is None:
            index = new.backend_index[address] = new.backend_indices.allocate()
        entry = BackendEntry(address, desired.macs.get(address), desired.backend_mtu(address))
        if new.backends.get(index) != entry:
            writes.append(Write(m.MAP_BACKENDS, _u32(index), bytes(m.make_backend(address, entry.mac, mtu=entry.mtu))))
            new.backends[index] = entry
    # 2. service indices
    assert new.service_indices is not None
    leaving = [k for k in new.service_index if k not in listed]
    arriving = [k for k in listed if k not in new.service_index]
    if len(arriving) > new.service_indices.available:
        _unname(new, writes, {new.service_index[k] for k in leaving}, clock)
        for key in leaving:
            _release(new, writes, key)
        leaving = []
    for key in arriving:
        new.service_index[key] = new.service_indices.allocate()
    # 3. figures from zero
    slots = {(new.service_index[k], new.backend_index[a]): (k, a) for k, addresses in listed.items()
             for a in addresses}
    fresh = sorted(slot for slot, owner in slots.items() if new.stat_slots.get(slot) != owner)
    if fresh:
        keys = array("I", (m.backend_stats_slot(s, b) for s, b in fresh)).tobytes()
        writes.append(Write(m.MAP_BACKEND_STATS, keys, bytes(ctypes.sizeof(m.RrBackendStats) * len(fresh))))
    new.stat_slots = slots
    # 4. members (old | new) and tables
    members: dict[int, frozenset[int]] = {}
    for service in services:
        i = new.service_index[service.key]
        members[i] = frozenset(new.backend_index[a] for a in listed[service.key])
        _write_members(new, writes, i, new.members.get(i, frozenset()) | members[i])
        _write_table(new, writes, i, service.table)
    # 5. name them: the config, then rr_services
    matcher = ServiceMatcher({s.key: s.key for s in services})
    catch_all = matcher.catch_all
    by_key = {s.key: s for s in services}
    config = ConfigImage(
        desired.local_address, bytes(desired.local_mac), desired.hash_seed & 0xFFFFFFFF,
        matcher.named4, 0 if catch_all is None else 1 + new.service_index[catch_all],
        0 if catch_all is None else new.tables[new.service_index[catch_all]].size, new.table_stride,
        tuple(int(t * _NS) for t in (desired.timeouts.tcp, desired.timeouts.udp, desired.timeouts.other)),
        desired.local_address6, matcher.named6, 0 if catch_all is None else option_flags(by_key[catch_all].options),
        desired.icmp_limit, 0 if new.config is None else new.config.services_gen, cache_families(services))
    if len(config.local_mac) != 6:
        raise ValueError("local_mac must be 6 bytes")
    renamed = new.config is None or new.config.naming() != config.naming()
    _write_config(new, writes, config)
    entries = {entry: (new.service_index[key], new.tables[new.service_index[key]].size,
                       option_flags(by_key[key].options)) for entry, key in matcher.entries.items()}
    for entry, value in sorted(entries.items()):
        if new.services.get(entry) != value:
            writes.append(Write(_services_map(entry), entry, bytes(m.RrService(*value))))
    for entry in sorted(set(new.services) - set(entries)):
        writes.append(Write(_services_map(entry), entry, None))
    if renamed or new.services != entries:
        _bump_services_gen(new, writes, clock)
    new.services = entries
    _write_quic(new, writes, services)
    # 6. members down to the new ones
    for i, bits in members.items():
        _write_members(new, writes, i, bits)
    # 7. services that left
    for key in leaving:
        _release(new, writes, key)
    # 8. backends no longer listed
    still = set(wanted)
    for address in [a for a in new.backend_index if a not in still]:
        index = new.backend_index.pop(address)
        if new.backends.pop(index, None) is not None:
            writes.append(Write(m.MAP_BACKENDS, _u32(index), bytes(m.make_backend(address, None, in_use=False))))
        new.backend_indices.free(index)
    return writes, new


def cache_families(services: Iterable[Service]) -> int:
    """rr_config.cache_services: the VIP families whose services all keep a connection table and have no
    QUIC, so their flows' packets mostly find an entry, which then names their service."""
    uncached = {m.CACHE_SERVICES6 if s.key.vip.version == 6 else m.CACHE_SERVICES4 for s in services
                if s.key.vip is not None and (not s.options.connection_table or s.options.quic)}
    return (m.CACHE_SERVICES4 | m.CACHE_SERVICES6) & ~sum(uncached)


def option_flags(options: ServiceOptions) -> int:
    """A service's options as rr_service.flags (bpf/rr_structs.h RR_OPT_*)."""
    return (int(options.hash) | (0 if options.connection_table else m.OPT_NO_CONNS)
            | (m.OPT_ANSWER_PING if options.answer_ping else 0) | (m.OPT_QUIC if options.quic else 0))


def _write_quic(new: MapImage, writes: list[Write], services: Iterable[Service]) -> None:
    """rr_quic: each listed backend's server ID in each service with quic = true; stale entries deleted."""
    wanted: dict[int, int] = {}
    for service in services:
        if not service.options.quic:
            continue
        listed = {int(b) for b in service.backends}
        index = new.service_index[service.key]
        for backend, server_id in service.options.server_ids:
            if backend in listed:
                wanted[m.quic_key(index, server_id)] = new.backend_index[backend]
    if len(wanted) > m.MAX_QUIC_IDS:
        raise ValueError(f"{len(wanted)} QUIC server IDs over every service: more than {m.MAX_QUIC_IDS}")
    for key, backend_index in sorted(wanted.items()):
        if new.quic.get(key) != backend_index:
            writes.append(Write(m.MAP_QUIC, _u32(key), _u32(backend_index)))
    for key in sorted(set(new.quic) - set(wanted)):
        writes.append(Write(m.MAP_QUIC, _u32(key), None))
    new.quic = wanted


def _services_map(entry: bytes) -> str:
    """rr_services for an IPv4 VIP's 8-byte entry, rr_services6 for an IPv6 VIP's 20-byte one."""
    return m.MAP_SERVICES if len(entry) == m.KEY_SIZES[m.MAP_SERVICES] else m.MAP_SERVICES6


def _u32(value: int) -> bytes:
    return array("I", (value,)).tobytes()


def _write_config(new: MapImage, writes: list[Write], config: ConfigImage) -> None:
    if new.config != config:
        writes.append(Write(m.MAP_CONFIG, _u32(0), config.value()))
        new.config = config


def _write_members(new: MapImage, writes: list[Write], index: int, bits: frozenset[int]) -> None:
    if new.members.get(index, frozenset()) == bits:
        new.members[index] = bits
        return
    words = [0] * m.MEMBER_WORDS
    for b in bits:
        words[b >> 6] |= 1 << (b & 63)
    start = index * m.MEMBER_WORDS
    writes.append(Write(m.MAP_MEMBERS, array("I", range(start, start + m.MEMBER_WORDS)).tobytes(),
                        array("Q", words).tobytes()))
    new.members[index] = bits


def _write_table(new: MapImage, writes: list[Write], index: int, table: MaglevTable) -> None:
    indices = tuple(new.backend_index[int(b)] for b in table.backends)
    old = new.tables.get(index)
    if old is not None and old.table is table and old.indices == indices:
        return
    slots = table.slots.tolist() if hasattr(table.slots, "tolist") else list(table.slots)
    packed = array("I", map(indices.__getitem__, slots)).tobytes()
    if old is None or old.slots != packed:
        start = index * new.table_stride
        if packed:
            writes.append(Write(m.MAP_MAGLEV, array("I", range(start, start + len(slots))).tobytes(), packed))
    new.tables[index] = TableImage(table, indices, packed)


def _bump_services_gen(new: MapImage, writes: list[Write], clock: Callable[[], int]) -> None:
    """rr_config again, with a services generation no connection entry can carry yet (step 5)."""
    assert new.config is not None
    _write_config(new, writes, replace(new.config, services_gen=max(new.config.services_gen + 1, clock())))


def _unname(new: MapImage, writes: list[Write], indices: Iterable[int], clock: Callable[[], int]) -> None:
    """Stop rr_services and the config naming the services of `indices` (before freeing them; the
    generation bumped, so no connection entry names them either)."""
    gone = set(indices)
    for entry, (i, _, _) in sorted(new.services.items()):
        if i in gone:
            writes.append(Write(_services_map(entry), entry, None))
            del new.services[entry]
    if new.config is not None and new.config.catch_all - 1 in gone:
        _write_config(new, writes, replace(new.config, catch_all=0, catch_all_size=0))
    if new.config is not None:
        _bump_services_gen(new, writes, clock)


def _release(new: MapImage, writes: list[Write], key: ServiceKey) -> None:
    """Forget a service nothing names any more: its members cleared, its index free for a later one."""
    index = new.service_index.pop(key)
    for quic_key in sorted(k for k in new.quic if k >> 16 == index):  # before another service takes the index
        writes.append(Write(m.MAP_QUIC, _u32(quic_key), None))
        del new.quic[quic_key]
    _write_members(new, writes, index, frozenset())
    del new.members[index]
    new.tables.pop(index, None)
    assert new.service_indices is not None
    new.service_indices.free(index)
