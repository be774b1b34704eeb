"""maglev_chunks: the engine for weighted and small pools, exact on unit pools too (weighted pools
against the weighted pseudocode: tests/test_maglev.py)."""

from __future__ import annotations

from ipaddress import IPv4Address

import numpy as np
import pytest

from rusty_rail.core.maglev import build_table, permutation_params
from rusty_rail.core.maglev_chunks import Chunks
from rusty_rail.core.maglev_rounds import Rounds


def addresses(n: int) -> list[IPv4Address]:
    return [IPv4Address(int(IPv4Address("10.2.0.0")) + i + 1) for i in range(n)]


@pytest.mark.parametrize("n", [100, 150, 1000])
def test_both_fill_engines_give_the_same_table(n: int) -> None:
    """Unit-weight pools of 100+ are filled round by round, others in chunks: both are exact."""
    size = 4099
    params = np.array([permutation_params(b, size) for b in addresses(n)], np.int64)
    ones = np.ones(n, np.int64)
    rounds = Rounds(params[:, 0], params[:, 1], ones, size).run() % n
    chunks = Chunks(params[:, 0], params[:, 1], ones, size).run() % n
    expected = build_table(addresses(n), size=size).slots
    assert rounds.tolist() == chunks.tolist() == expected.tolist()
