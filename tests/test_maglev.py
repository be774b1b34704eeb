from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address, ip_address

import numpy as np
import pytest

from rusty_rail.core import constants, maglev
from rusty_rail.core.maglev import MaglevTable, build_table, canonical_backends, is_prime, permutation_params
from tests.oracle import oracle_maglev

M = 65537
SMALL_PRIMES = [2, 3, 5, 7, 11, 13, 17, 31, 61, 101, 251]


def addresses(n: int, base: str = "10.2.0.0") -> list[IPv4Address]:
    return [IPv4Address(int(IPv4Address(base)) + i + 1) for i in range(n)]


def weighted_oracle(backends: list, size: int, weights: list[int] | None = None) -> list[str]:
    """Pseudocode 1 literally, for IPv4 and IPv6 alike, backend i taking weights[i] consecutive turns
    a round (weights in the order `backends` is given): permutation[i][j] = (offset + j * skip) mod M."""
    given = [ip_address(str(b)) for b in backends]
    weight_of = dict(zip(given, weights or [1] * len(given)))
    names = sorted(set(given), key=lambda a: (a.version, int(a)))
    turns = [weight_of[b] for b in names]

    def h(key: bytes, name: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(name, key=key, digest_size=8).digest(), "big")

    offset = [h(b"rusty-rail/maglev/offset", b.packed) % size for b in names]
    skip = [h(b"rusty-rail/maglev/skip", b.packed) % (size - 1) + 1 for b in names]
    nxt = [0] * len(names)
    entry = [-1] * size
    n = 0
    while True:
        for i in range(len(names)):
            for _ in range(turns[i]):
                c = (offset[i] + nxt[i] * skip[i]) % size
                while entry[c] >= 0:
                    nxt[i] += 1
                    c = (offset[i] + nxt[i] * skip[i]) % size
                entry[c] = i
                nxt[i] += 1
                n += 1
                if n == size:
                    return [str(names[e]) for e in entry]


def resolved(table: MaglevTable) -> list[str]:
    return [str(table.backends[i]) for i in table.slots.tolist()]


def test_matches_the_papers_pseudocode_literally() -> None:
    backends = addresses(7)
    table = build_table(backends, size=M)
    assert [str(table.backends[i]) for i in table.slots] == oracle_maglev([str(b) for b in backends], M)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 1000])
def test_equal_weights_floor_or_ceil(n: int) -> None:
    counts = build_table(addresses(n), size=M).slot_counts()
    assert set(counts) <= {M // n, -(-M // n)}
    assert sum(counts) == M


def test_weights_within_one_percent() -> None:
    backends = addresses(5)
    weights = [1, 2, 3, 5, 10]
    counts = build_table(backends, size=M, weights=weights).slot_counts()
    for w, c in zip(weights, counts):
        assert abs(c - M * w / sum(weights)) <= 0.01 * M


def test_weight_zero_gets_no_slots() -> None:
    backends = addresses(3)
    table = build_table(backends, size=M, weights={backends[0]: 0, backends[1]: 1, backends[2]: 1})
    assert table.slot_counts()[0] == 0 and len(table.backends) == 3


def test_removing_one_of_100_moves_little() -> None:
    backends = addresses(100)
    before = build_table(backends, size=M)
    removed = backends[37]
    after = build_table([b for b in backends if b != removed], size=M)
    moved = sum(
        1
        for slot in range(M)
        if before.backends[before.slots[slot]] != removed and before.backends[before.slots[slot]] != after.backends[after.slots[slot]]
    )
    assert moved <= 0.015 * M


def test_order_of_input_does_not_matter() -> None:
    backends = addresses(20)
    assert list(build_table(backends).slots) == list(build_table(list(reversed(backends))).slots)


def test_mixed_families_in_canonical_order_match_the_oracle() -> None:
    backends = ["2001:db8:2::2", "10.2.0.2", "2001:db8:2::1", "10.2.0.1"]
    table = build_table(backends, size=251)
    assert [str(b) for b in table.backends] == ["10.2.0.1", "10.2.0.2", "2001:db8:2::1", "2001:db8:2::2"]
    assert [str(table.backends[i]) for i in table.slots] == oracle_maglev(backends, 251)
    assert build_table(list(reversed(backends)), size=251) == table  # tables equal by value (slots an array)


def test_same_table_in_another_process_with_another_hash_seed() -> None:
    code = (
        "import json; from rusty_rail.core.maglev import build_table; "
        "print(json.dumps(build_table(['10.2.0.3', '10.2.0.1', '10.2.0.2'], size=251).slots.tolist()))"
    )
    for seed in ("1", "999"):
        out = subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == build_table(["10.2.0.1", "10.2.0.2", "10.2.0.3"], size=251).slots.tolist()


def test_no_backends_and_bad_sizes() -> None:
    assert build_table([]).slots.tolist() == [] and build_table([]).backend_for(5) is None
    with pytest.raises(ValueError, match="prime"):
        build_table(addresses(2), size=65536)
    with pytest.raises(ValueError):
        build_table(addresses(2), weights=[1])
    assert is_prime(65537) and is_prime(655373) and not is_prime(1)


# --- exactness against the literal pseudocode --------------------------------------------------


@pytest.mark.parametrize("size", SMALL_PRIMES)
def test_every_pool_of_1_to_50_matches_the_oracle(size: int) -> None:
    pool = addresses(50, base="10.9.0.0")
    for n in range(1, 51):
        backends = pool[:n]
        assert resolved(build_table(backends, size=size)) == oracle_maglev([str(b) for b in backends], size), n


@pytest.mark.parametrize("n,base", [(1000, "10.2.0.0"), (999, "172.16.3.7"), (1031, "192.168.0.0"), (537, "10.7.1.1")])
def test_pools_of_about_1000_match_the_oracle(n: int, base: str) -> None:
    backends = addresses(n, base=base)
    assert resolved(build_table(backends, size=M)) == oracle_maglev([str(b) for b in backends], M)


def test_the_weighted_oracle_is_the_plain_one_with_unit_weights() -> None:
    backends = [str(b) for b in addresses(30)]
    assert weighted_oracle(backends, 251) == oracle_maglev(backends, 251)


@pytest.mark.parametrize("size", [7, 61, 251, 4099])
def test_weights_match_the_oracle(size: int) -> None:
    rng = random.Random(size)
    for n in (1, 2, 3, 7, 20, 60):
        backends = addresses(n, base=f"10.{n}.0.0")
        weights = [rng.choice([0, 1, 1, 2, 3, 8]) for _ in range(n)]
        if not any(weights):
            weights[0] = 1
        assert resolved(build_table(backends, size=size, weights=weights)) == weighted_oracle(backends, size, weights)


def test_large_weighted_pool_matches_the_oracle() -> None:
    rng = random.Random(3)
    backends = addresses(400, base="10.40.0.0")
    weights = [rng.randrange(0, 6) for _ in backends]
    weights[-1] = 40  # one heavy backend: many consecutive turns a round
    size = 16411
    assert resolved(build_table(backends, size=size, weights=weights)) == weighted_oracle(backends, size, weights)


def test_ipv6_and_mixed_pools_match_the_oracle() -> None:
    v6 = [IPv6Address("2001:db8::1") + 7919 * i for i in range(40)]
    mixed = [*addresses(25, base="10.3.0.0"), *v6[:25]]
    for size in (61, 251, 4099):
        assert resolved(build_table(v6, size=size)) == weighted_oracle(v6, size)
        assert resolved(build_table(mixed, size=size)) == weighted_oracle(mixed, size)
    weights = [1 + i % 3 for i in range(len(mixed))]
    assert resolved(build_table(mixed, size=4099, weights=weights)) == weighted_oracle(mixed, 4099, weights)
    assert resolved(build_table(mixed + v6[25:] * 30, size=M)) == weighted_oracle(mixed + v6[25:], M)


def test_the_papers_table_1() -> None:
    """Eisenbud et al., Table 1: B0 (offset 3, skip 4), B1 (0, 2), B2 (3, 1), M = 7."""
    offset, skip = np.array([3, 0, 3]), np.array([4, 2, 1])
    slots = maglev._fill(offset, skip, np.ones(3, np.int64), 7)
    assert slots.tolist() == [1, 0, 1, 0, 2, 2, 0]


def test_more_backends_than_slots() -> None:
    for n in (8, 120, 300):
        backends = addresses(n)
        table = build_table(backends, size=7)
        assert resolved(table) == oracle_maglev([str(b) for b in backends], 7)
        assert sorted(table.slots.tolist()) == list(range(7))


# --- the table object and the backends --------------------------------------------------------


def test_slots_are_a_read_only_int32_array() -> None:
    table = build_table(addresses(5), size=251)
    assert isinstance(table.slots, np.ndarray) and table.slots.dtype == np.int32 and table.size == 251
    with pytest.raises(ValueError):
        table.slots[0] = 1
    empty = build_table(addresses(3), size=251, weights=[0, 0, 0])
    assert empty.slots.dtype == np.int32 and empty.size == 0 and empty.backend_for(7) is None
    assert empty.slot_counts() == [0, 0, 0]


def test_tables_compare_by_value() -> None:
    a = build_table(addresses(10), size=251)
    b = build_table(list(reversed(addresses(10))), size=251)
    assert a == b and hash(a) == hash(b) and a is not b
    assert a != build_table(addresses(11), size=251)
    assert a != build_table(addresses(10), size=251, weights=[2] + [1] * 9)
    assert MaglevTable(a.backends, a.slots.tolist(), a.weights) == a
    assert len({a, b}) == 1


def test_backend_for_and_slot_counts() -> None:
    table = build_table(addresses(4), size=61)
    counts = table.slot_counts()
    assert sum(counts) == 61 and isinstance(counts[0], int)
    for flow_hash in (0, 60, 61, 12345):
        assert table.backend_for(flow_hash) == table.backends[table.slots[flow_hash % 61]]


def test_canonical_order_is_ipv4_then_ipv6_numerically() -> None:
    given = ["2001:db8::2", "10.0.0.2", IPv6Address("2001:db8::1"), int(IPv4Address("10.0.0.1")), "10.0.0.2"]
    assert canonical_backends(given) == (IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"),
                                         IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2"))
    assert build_table(given, size=61, weights={"10.0.0.1": 1, "10.0.0.2": 2, "2001:db8::1": 0,
                                                "2001:db8::2": 3}).weights == (1, 2, 0, 3)


def test_ipv4_tables_are_unchanged_by_ipv6_support() -> None:
    """permutation_params hashes the packed address, so an IPv4 pool's table is what it always was."""
    backend = IPv4Address("10.2.0.1")
    name = backend.packed
    key_o, key_s = b"rusty-rail/maglev/offset", b"rusty-rail/maglev/skip"
    digest = lambda key: int.from_bytes(hashlib.blake2b(name, key=key, digest_size=8).digest(), "big")  # noqa: E731
    assert permutation_params(backend, M) == (digest(key_o) % M, digest(key_s) % (M - 1) + 1)


def test_default_size_comes_from_constants() -> None:
    assert maglev.DEFAULT_TABLE_SIZE is constants.DEFAULT_TABLE_SIZE
    assert build_table(addresses(3)).size == constants.DEFAULT_TABLE_SIZE


def test_a_rebuild_hashes_only_the_new_backend() -> None:
    backends = addresses(200, base="10.77.0.0")
    build_table(backends, size=M)
    before = permutation_params.cache_info()
    build_table([*backends, IPv4Address("10.78.0.1")], size=M)
    after = permutation_params.cache_info()
    assert after.misses - before.misses == 1
