"""maglev_fill: the engines behind build_table, checked against Pseudocode 1 literally (tests/oracle.py)."""

from __future__ import annotations

import random
from ipaddress import IPv4Address

import numpy as np
import pytest

from rusty_rail.core import maglev_fill
from rusty_rail.core.maglev import build_table
from tests.oracle import oracle_maglev


def test_round_by_round_finishes_its_last_moving_turns_in_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-turn finish must run (and agree with the oracle) on a pool filled round by round."""
    calls = []
    finish = maglev_fill._Rounds.finish

    def counted(self, moving, *args):  # noqa: ANN001, ANN202
        calls.append(len(moving))
        return finish(self, moving, *args)

    monkeypatch.setattr(maglev_fill._Rounds, "finish", counted)
    rng = random.Random(9)
    for size, n in ((4099, 150), (65537, 120)):
        base = rng.randrange(1 << 24, 1 << 31)
        backends = [str(IPv4Address(base + 7 * i)) for i in range(n)]
        table = build_table(backends, size=size)
        assert [str(table.backends[i]) for i in table.slots.tolist()] == oracle_maglev(backends, size)
    assert calls and max(calls) >= 1


def test_a_single_backend_takes_every_slot() -> None:
    assert maglev_fill.fill(np.array([3]), np.array([2]), np.ones(1, np.int64), 7).tolist() == [0] * 7
