"""The XDP map planner (engines/xdp/planner.py), pure: no BPF, no root.

Writes are applied one by one to a dictionary model of the maps, and after every single write the
maps must be safe for the program to run on (everything a service names is written, every backend a
named table or member bitmap names is in use); after the last one they must hold exactly the desired
state. Hypothesis walks chains of service changes (the catch-all among them) through that check.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rusty_rail.core.options import ServiceOptions
from rusty_rail.core.service import ServiceKey, ServiceMatcher, ServiceProtocol
from rusty_rail.dataplane import DataplaneState, StateBuilder
from rusty_rail.engines.xdp import maps as m
from rusty_rail.engines.xdp.planner import (Desired, IndexAllocator, MapImage, Write, adopt, cache_families, option_flags,
                                            plan)

TABLE_SIZE = 13
LB, LB6, LB_MAC = IPv4Address("192.168.137.11"), IPv6Address("2001:db8:137::11"), bytes.fromhex("020000000011")
POOL = [f"10.2.0.{i}" for i in range(1, 5)] + ["2001:db8:2::1", "2001:db8:2::2"]  # mixed, as pools may be
MACS = {int(ip_address(b)): bytes.fromhex(f"0200000002{i:02x}") for i, b in enumerate(POOL, 1)}
CATCH_ALL = ServiceKey.catch_all()
TCP, UDP = ServiceProtocol.TCP, ServiceProtocol.UDP
KEYS = [CATCH_ALL, ServiceKey(IPv4Address("10.1.0.1"), TCP, 80), ServiceKey(IPv4Address("10.1.0.1"), TCP, 443),
        ServiceKey(IPv4Address("10.1.0.1"), UDP, 0), ServiceKey(IPv4Address("10.1.0.2")),
        ServiceKey(IPv6Address("2001:db8:1::1"), TCP, 443), ServiceKey(IPv6Address("2001:db8:1::1"))]
VALUE_SIZES = {m.MAP_CONFIG: ctypes.sizeof(m.RrConfig), m.MAP_BACKENDS: ctypes.sizeof(m.RrBackend), m.MAP_MAGLEV: 4,
               m.MAP_SERVICES: ctypes.sizeof(m.RrService), m.MAP_SERVICES6: ctypes.sizeof(m.RrService),
               m.MAP_MEMBERS: 8, m.MAP_BACKEND_STATS: ctypes.sizeof(m.RrBackendStats), m.MAP_QUIC: 4}
SERVICE_MAPS = (m.MAP_SERVICES, m.MAP_SERVICES6)


def state(wanted: dict[ServiceKey, dict[str, int]], builder: StateBuilder | None = None) -> DataplaneState:
    builder = builder or StateBuilder(TABLE_SIZE)
    return builder.build({k: {ip_address(b): w for b, w in v.items()} for k, v in wanted.items()})


def desired(s: DataplaneState, macs=MACS) -> Desired:
    return Desired(s, LB, LB_MAC, macs, local_address6=LB6, mtu=1400)


def empty(max_services: int = 4) -> MapImage:
    return MapImage(TABLE_SIZE, max_services)


class Maps:
    """The maps as dictionaries of key bytes -> value bytes, written as the program would see them."""

    def __init__(self) -> None:
        self.maps: dict[str, dict[bytes, bytes]] = {name: {} for name in VALUE_SIZES}

    def apply(self, w: Write) -> None:
        k = m.KEY_SIZES[w.map]
        n = len(w.key) // k
        assert n * k == len(w.key) and n >= 1
        if w.value is None:
            assert n == 1 and w.map in SERVICE_MAPS  # only hash entries are deleted
            del self.maps[w.map][w.key]
            return
        v = VALUE_SIZES[w.map]
        assert len(w.value) == n * v, w.map
        for i in range(n):
            self.maps[w.map][w.key[i * k:(i + 1) * k]] = w.value[i * v:(i + 1) * v]

    def u32(self, name: str, index: int) -> bytes | None:
        return self.maps[name].get(struct.pack("=I", index))

    def config(self) -> m.RrConfig | None:
        raw = self.u32(m.MAP_CONFIG, 0)
        return None if raw is None else m.RrConfig.from_buffer_copy(raw)

    def backend(self, index: int) -> m.RrBackend | None:
        raw = self.u32(m.MAP_BACKENDS, index)
        return None if raw is None else m.RrBackend.from_buffer_copy(raw)

    def named(self) -> dict[int, int]:
        """Service index -> table size, for every service the program can find now."""
        out = {}
        cfg = self.config()
        if cfg is not None and cfg.catch_all:
            out[cfg.catch_all - 1] = cfg.catch_all_size
        for name in SERVICE_MAPS:
            for raw in self.maps[name].values():
                value = m.RrService.from_buffer_copy(raw)
                out[value.index] = value.table_size
        return out

    def table(self, index: int, size: int) -> list[int]:
        return [struct.unpack("=I", self.u32(m.MAP_MAGLEV, index * TABLE_SIZE + s))[0] for s in range(size)]

    def members(self, index: int) -> set[int]:
        bits = set()
        for w in range(m.MEMBER_WORDS):
            raw = self.u32(m.MAP_MEMBERS, index * m.MEMBER_WORDS + w)
            word = struct.unpack("=Q", raw)[0] if raw else 0
            bits |= {w * 64 + b for b in range(64) if word >> b & 1}
        return bits

    def check_safe(self) -> None:
        """What the program can reach now is written: every slot of a named table and every member bit
        of a named service is a backend in use."""
        for index, size in self.named().items():
            for b in self.table(index, size) + sorted(self.members(index)):
                entry = self.backend(b)
                assert entry is not None and entry.in_use, (index, b)

    def check_holds(self, d: Desired, image: MapImage) -> None:
        """The maps hold `d` exactly, as `image` says."""
        services = d.state.by_key()
        index_of = image.backend_index
        matcher = ServiceMatcher(services)
        cfg = self.config()
        assert cfg is not None and cfg.table_stride == TABLE_SIZE
        assert (cfg.named_services, cfg.named_services6) == (matcher.named4, matcher.named6)
        assert bytes(cfg.local_addr) == LB.packed and bytes(cfg.local_mac) == LB_MAC
        assert bytes(cfg.local_addr6) == LB6.packed
        if matcher.catch_all is None:
            assert cfg.catch_all == 0
        else:
            assert cfg.catch_all == 1 + image.service_index[CATCH_ALL]
            assert cfg.catch_all_size == len(matcher.catch_all.table.slots)
            assert cfg.catch_all_flags == option_flags(matcher.catch_all.options)
        got = {k: m.RrService.from_buffer_copy(v) for name in SERVICE_MAPS for k, v in self.maps[name].items()}
        assert all(len(k) == m.KEY_SIZES[name] for name in SERVICE_MAPS for k in self.maps[name])
        assert {k: (v.index, v.table_size, v.flags) for k, v in got.items()} == {
            entry: (image.service_index[s.key], len(s.table.slots), option_flags(s.options))
            for entry, s in matcher.entries.items()}
        for key, service in services.items():
            i = image.service_index[key]
            table = service.table
            assert self.table(i, len(table.slots)) == [index_of[int(table.backends[s])] for s in table.slots]
            assert self.members(i) == {index_of[int(b)] for b in table.backends}
        in_use = {i for i in range(m.MAX_BACKENDS) if (b := self.backend(i)) is not None and b.in_use}
        wanted = {int(b) for s in services.values() for b in s.backends}
        assert in_use == {index_of[a] for a in wanted} and set(index_of) == wanted
        for a in wanted:
            entry = self.backend(index_of[a])
            assert m.from_identity(bytes(entry.addr)) == a and entry.ipv6 == (ip_address(a).version == 6)
            assert (bytes(entry.mac) if entry.has_mac else None) == d.macs.get(a)
            assert entry.mtu == d.backend_mtu(a) == 1400  # the device's: no route sets one here


def run(maps: Maps, d: Desired, image: MapImage) -> tuple[list[Write], MapImage]:
    writes, new = plan(d, image)
    for w in writes:
        maps.apply(w)
        maps.check_safe()
    maps.check_holds(d, new)
    return writes, new


# -- the allocator ---------------------------------------------------------------------------------


def test_allocator_lowest_free_first_and_limit() -> None:
    a = IndexAllocator(4, "things")
    assert [a.allocate() for _ in range(3)] == [0, 1, 2]
    a.free(1)
    a.free(0)
    copy = a.copy()
    assert a.allocate() == 0 and a.allocate() == 1 and a.allocate() == 3
    with pytest.raises(ValueError, match="more than 4 things"):
        a.allocate()
    assert copy.allocate() == 0 and len(copy) == 2  # the copy is independent
    b = IndexAllocator(8, "things")
    b.take(5)
    assert [b.allocate() for _ in range(6)] == [0, 1, 2, 3, 4, 6]
    with pytest.raises(ValueError):
        b.take(5)


# -- plans ---------------------------------------------------------------------------------------------


def test_environment_form_is_one_catch_all_without_lookup_entries() -> None:
    maps = Maps()
    d = desired(state({CATCH_ALL: {b: 1 for b in POOL[:3]}}))
    writes, image = run(maps, d, empty())
    assert not maps.maps[m.MAP_SERVICES] and not any(w.map == m.MAP_SERVICES for w in writes)
    cfg = maps.config()
    assert (cfg.named_services, cfg.catch_all, cfg.catch_all_size) == (0, 1, TABLE_SIZE)
    assert image.backend_index == {int(ip_address(b)): i for i, b in enumerate(POOL[:3])}


def test_the_service_cache_is_off_for_a_family_with_quic_or_without_a_connection_table() -> None:
    """rr_config.cache_services: a family's flows look their entry up first only when every service with
    a VIP of that family writes entries for them (the catch-all is found without a lookup anyway)."""
    s = state({KEYS[1]: {POOL[0]: 1}, KEYS[-1]: {POOL[1]: 1}, CATCH_ALL: {POOL[2]: 1}}).services
    both = m.CACHE_SERVICES4 | m.CACHE_SERVICES6

    def options(key: ServiceKey, o: ServiceOptions):
        return tuple(replace(x, options=o) if x.key == key else x for x in s)

    assert cache_families(s) == both
    assert cache_families(options(KEYS[1], ServiceOptions(quic=True))) == m.CACHE_SERVICES6
    assert cache_families(options(KEYS[-1], ServiceOptions(connection_table=False))) == m.CACHE_SERVICES4
    assert cache_families(options(CATCH_ALL, ServiceOptions(connection_table=False))) == both


def test_plan_is_pure_and_idempotent() -> None:
    d = desired(state({CATCH_ALL: {b: 1 for b in POOL[:2]}, KEYS[1]: {POOL[2]: 1}}))
    image = empty()
    before = image.copy()
    clock = lambda: 1_000  # noqa: E731 (the services generation's clock, held still)
    first, after = plan(d, image, clock)
    assert plan(d, image, clock)[0] == first    # the same answer again: nothing changed in `image`
    assert image == before
    assert plan(d, after)[0] == []              # the maps hold it already
    rebuilt = desired(state({CATCH_ALL: {b: 1 for b in POOL[:2]}, KEYS[1]: {POOL[2]: 1}}))
    assert plan(rebuilt, after)[0] == []        # equal tables from another builder: nothing either


def test_a_neighbour_change_is_one_backend_write() -> None:
    s = state({CATCH_ALL: {b: 1 for b in POOL[:3]}})
    _, image = run(Maps(), desired(s, {}), empty())
    writes, _ = plan(desired(s, {int(ip_address(POOL[1])): b"\x02" * 6}), image)
    assert [(w.map, w.key) for w in writes] == [(m.MAP_BACKENDS, struct.pack("=I", 1))]


def test_order_backends_and_tables_before_names_retirements_last() -> None:
    maps = Maps()
    builder = StateBuilder(TABLE_SIZE)
    _, image = run(maps, desired(state({KEYS[1]: {POOL[0]: 1, POOL[1]: 1}}, builder)), empty())
    writes, image = run(maps, desired(state({KEYS[2]: {POOL[1]: 1, POOL[2]: 1}}, builder)), image)
    kinds = [w.map for w in writes]
    first_name = kinds.index(m.MAP_SERVICES)
    assert kinds.index(m.MAP_MAGLEV) < first_name and kinds.index(m.MAP_BACKENDS) < first_name
    # The leaving service's entries go before its members are cleared; the leaving backend is last.
    deletes = [i for i, w in enumerate(writes) if w.map == m.MAP_SERVICES and w.value is None]
    assert deletes and max(deletes) < max(i for i, k in enumerate(kinds) if k == m.MAP_MEMBERS)
    assert writes[-1].map == m.MAP_BACKENDS and writes[-1].key == struct.pack("=I", 0)
    assert not m.RrBackend.from_buffer_copy(writes[-1].value).in_use
    assert image.backend_index[int(ip_address(POOL[1]))] == 1  # still listed: the same index


def test_freed_indices_are_reused_only_by_a_later_plan() -> None:
    maps = Maps()
    _, image = run(maps, desired(state({CATCH_ALL: {POOL[0]: 1, POOL[1]: 1}})), empty())
    _, image = run(maps, desired(state({CATCH_ALL: {POOL[0]: 1, POOL[2]: 1}})), image)
    assert image.backend_index[int(ip_address(POOL[2]))] == 2          # not 1: POOL[1] was leaving
    _, image = run(maps, desired(state({CATCH_ALL: {POOL[0]: 1, POOL[2]: 1, POOL[3]: 1}})), image)
    assert image.backend_index[int(ip_address(POOL[3]))] == 1          # now it is free


def test_stat_slots_start_from_zero_on_join_rejoin_and_reuse() -> None:
    maps = Maps()
    _, image = run(maps, desired(state({KEYS[1]: {POOL[0]: 1, POOL[1]: 1}})), empty())
    zeroed = lambda writes: {k for w in writes if w.map == m.MAP_BACKEND_STATS  # noqa: E731
                             for k in struct.unpack(f"={len(w.key) // 4}I", w.key)}
    writes, image = run(maps, desired(state({KEYS[1]: {POOL[0]: 1}})), image)
    assert not zeroed(writes)
    writes, image = run(maps, desired(state({KEYS[1]: {POOL[0]: 1, POOL[1]: 1}})), image)
    assert zeroed(writes) == {m.backend_stats_slot(0, 1)}               # POOL[1] rejoined
    writes, image = run(maps, desired(state({KEYS[2]: {POOL[0]: 1}})), image)
    writes, image = run(maps, desired(state({KEYS[2]: {POOL[0]: 1}, KEYS[3]: {POOL[0]: 1}})), image)
    assert image.service_index[KEYS[3]] == 0                            # KEYS[1]'s old index ...
    assert zeroed(writes) == {m.backend_stats_slot(0, 0)}               # ... and none of its counts
    assert image.stat_slots == {(1, 0): (KEYS[2], int(ip_address(POOL[0]))),
                                (0, 0): (KEYS[3], int(ip_address(POOL[0])))}


def test_drained_catch_all_has_no_slots_and_keeps_members() -> None:
    maps = Maps()
    _, image = run(maps, desired(state({CATCH_ALL: {POOL[0]: 1, POOL[1]: 1}})), empty())
    run(maps, desired(state({CATCH_ALL: {POOL[0]: 0, POOL[1]: 0}})), image)
    assert maps.config().catch_all_size == 0 and maps.members(0) == {0, 1}


def test_every_index_taken_leaving_services_are_unnamed_first() -> None:
    maps = Maps()
    _, image = run(maps, desired(state({KEYS[1]: {POOL[0]: 1}, KEYS[2]: {POOL[1]: 1}})), empty(max_services=2))
    writes, image = run(maps, desired(state({KEYS[1]: {POOL[0]: 1}, KEYS[4]: {POOL[2]: 1}})), image)
    gone = KEYS[2].entry()
    assert writes.index(Write(m.MAP_SERVICES, gone, None)) < min(i for i, w in enumerate(writes)
                                                                   if w.map == m.MAP_MAGLEV)
    assert image.service_index[KEYS[4]] == 1
    with pytest.raises(ValueError, match="max_services"):
        plan(desired(state({k: {POOL[0]: 1} for k in KEYS[:3]})), image)


def test_what_the_maps_cannot_hold_is_refused_whole() -> None:
    image = empty()
    big = StateBuilder(17).build({CATCH_ALL: {ip_address(POOL[0]): 1}})
    with pytest.raises(ValueError, match="slots"):
        plan(desired(big), image)
    many = [f"10.3.{i >> 8}.{i & 255}" for i in range(m.MAX_BACKENDS + 1)]
    with pytest.raises(ValueError, match="backends"):
        plan(desired(state({CATCH_ALL: {b: 0 for b in many}})), image)
    assert image == empty()


def test_adopted_indices_are_kept_and_unwanted_ones_freed_later() -> None:
    a, b, c = (int(ip_address(x)) for x in POOL[:3])
    image = adopt(empty(), {3: a, 7: b})
    maps = Maps()
    writes, image = run(maps, desired(state({CATCH_ALL: {POOL[0]: 1, POOL[2]: 1}})), image)
    assert image.backend_index == {a: 3, c: 0}
    assert not any(w.map == m.MAP_BACKENDS and w.key == struct.pack("=I", 7) for w in writes)  # never written
    _, image = run(maps, desired(state({CATCH_ALL: {b: 1 for b in POOL[:6]}})), image)
    assert sorted(image.backend_index.values()) == [0, 1, 2, 3, 4, 5] and image.backend_index[a] == 3


# -- chains of changes ---------------------------------------------------------------------------------

pools = st.dictionaries(st.sampled_from(POOL), st.sampled_from([0, 1, 1, 2]), max_size=4)
states = st.dictionaries(st.sampled_from(KEYS), pools, max_size=4)
neighbours = st.sets(st.sampled_from(POOL)).map(lambda known: {int(ip_address(b)): MACS[int(ip_address(b))]
                                                               for b in known})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(states, neighbours), min_size=1, max_size=5))
def test_every_write_leaves_the_maps_safe(chain) -> None:
    maps, image, builder = Maps(), empty(max_services=4), StateBuilder(TABLE_SIZE)
    for wanted, macs in chain:
        before = image
        s = state(wanted, builder)
        _, image = run(maps, desired(s, macs), image)
        listed = {int(b) for svc in s.services for b in svc.backends}
        for address, index in before.backend_index.items():  # listed before and now: the same index
            if address in listed:
                assert image.backend_index[address] == index
        for slot, owner in image.stat_slots.items():  # figures start from zero for a new owner
            if before.stat_slots.get(slot) != owner:
                assert maps.u32(m.MAP_BACKEND_STATS, m.backend_stats_slot(*slot)) == bytes(16), (slot, owner)
        for slot in image.stat_slots:  # traffic: every slot in use counts something
            maps.maps[m.MAP_BACKEND_STATS][struct.pack("=I", m.backend_stats_slot(*slot))] = b"\x01" * 16


def test_ipv6_entries_go_to_rr_services6_and_a_missing_source_is_refused() -> None:
    v6 = KEYS[5]
    s = state({v6: {"2001:db8:2::1": 1}, KEYS[1]: {"10.2.0.1": 1}})
    writes, image = run(Maps(), desired(s), empty())
    assert {w.map for w in writes if w.map in SERVICE_MAPS} == {m.MAP_SERVICES, m.MAP_SERVICES6}
    with pytest.raises(ValueError, match="2001:db8:2::1 is IPv6 but the device has no global IPv6 address"):
        plan(Desired(s, LB, LB_MAC, MACS), empty())
    with pytest.raises(ValueError, match="10.2.0.1 is IPv4 but the device has no IPv4 address"):
        plan(Desired(s, None, LB_MAC, MACS, local_address6=LB6), empty())
