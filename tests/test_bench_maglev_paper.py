"""The paper's balance and disruption figures, on tables small enough to check by hand."""

from __future__ import annotations

import random

import numpy as np

from rusty_rail.bench import maglev_paper
from rusty_rail.core.maglev import build_table


def test_balance_is_floor_or_ceil_of_m_over_n() -> None:
    b = maglev_paper.balance(7, 251)
    assert (b["max"], b["min"]) == (36, 35)  # 251 = 7 * 35 + 6
    assert b["max_over_min"] == 36 / 35
    assert b["max_over_avg"] == 36 / (251 / 7)


def test_changed_counts_slots_by_address_not_by_index() -> None:
    backends = maglev_paper.addresses(5)
    full = build_table(backends, 101)
    assert maglev_paper.changed(full, full) == 0.0
    # Without the first backend every index shifts by one; only the slots it owned (and those Maglev
    # reshuffles) may change owner, so an index comparison would overstate the disruption.
    left = build_table(backends[1:], 101)
    owners_before = np.array([int(b) for b in full.backends])[full.slots]
    owners_after = np.array([int(b) for b in left.backends])[left.slots]
    assert maglev_paper.changed(full, left) == np.mean(owners_before != owners_after)
    assert maglev_paper.changed(full, left) >= full.slot_counts()[0] / 101


def test_one_change_moves_at_least_the_minimum_and_failures_grow() -> None:
    rng = random.Random(3)
    c = maglev_paper.one_change(20, 1009, rng)
    assert c["leave"] >= c["leave_minimum"] > 0
    assert c["join"] >= c["join_minimum"] * 0.9  # a joiner takes about M/(N+1), give or take a round
    f = maglev_paper.failures(1009, 50, (2, 10, 20), rng)
    assert f[2] < f[10] < f[20] <= 1.0
