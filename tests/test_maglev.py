from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Address

import pytest

from rusty_rail.core.maglev import build_table, is_prime
from tests.oracle import oracle_maglev

M = 65537


def addresses(n: int, base: str = "10.2.0.0") -> list[IPv4Address]:
    return [IPv4Address(int(IPv4Address(base)) + i + 1) for i in range(n)]


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
    assert build_table(list(reversed(backends)), size=251).slots == table.slots


def test_same_table_in_another_process_with_another_hash_seed() -> None:
    code = (
        "import json; from rusty_rail.core.maglev import build_table; "
        "print(json.dumps(list(build_table(['10.2.0.3', '10.2.0.1', '10.2.0.2'], size=251).slots)))"
    )
    for seed in ("1", "999"):
        out = subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == list(build_table(["10.2.0.1", "10.2.0.2", "10.2.0.3"], size=251).slots)


def test_no_backends_and_bad_sizes() -> None:
    assert build_table([]).slots == [] and build_table([]).backend_for(5) is None
    with pytest.raises(ValueError, match="prime"):
        build_table(addresses(2), size=65536)
    with pytest.raises(ValueError):
        build_table(addresses(2), weights=[1])
    assert is_prime(65537) and is_prime(655373) and not is_prime(1)
