"""maglev_scan: the list scan both fills share, and the inverse of a skip."""

from __future__ import annotations

import numpy as np

from rusty_rail.core.maglev_scan import UNCLAIMED, FillState, modinv


def scan_state(size: int = 101) -> FillState:
    state = FillState(np.array([0, 5]), np.array([1, 7]), np.ones(2, np.int64), size)
    state.claim[[0, 1, 2, 5, 12, 19]] = 3  # held by turn 3
    return state


def test_first_open_skips_slots_held_by_earlier_turns() -> None:
    state, skip, start = scan_state(), np.array([1, 7], np.int32), np.array([0, 5], np.int32)
    assert state.first_open(skip, start, np.array([9, 9], np.int32), 1).tolist() == [3, 26]
    # a slot held by a later turn is open to an earlier one: it would displace it
    assert state.first_open(skip, start, np.array([2, 2], np.int32), 4).tolist() == [0, 5]


def test_without_going_on_a_row_that_finds_nothing_ends_on_the_last_slot_it_saw() -> None:
    state, skip, start = scan_state(), np.array([1, 7], np.int32), np.array([0, 5], np.int32)
    out = state.first_open(skip, start, np.array([9, 9], np.int32), 2, go_on=False)
    assert out.tolist() == [1, 12]
    assert (state.claim[out] < 9).all() and state.claim[26] == UNCLAIMED


def test_modinv_inverts_every_skip() -> None:
    size = 65537
    skip = np.arange(1, size, 997, dtype=np.int64)
    assert (skip * modinv(skip, size) % size == 1).all()
