"""maglev_fill: which engine fills a pool (unit weights of ROUND_POOL or more: rounds), and a pool of one."""

from __future__ import annotations

import numpy as np
import pytest

from rusty_rail.core import maglev_fill


@pytest.mark.parametrize(("weights", "engine"),
                         [([1] * 100, "Rounds"), ([1] * 99, "Chunks"), ([1] * 99 + [2], "Chunks")])
def test_unit_pools_of_round_pool_or_more_go_round_by_round(monkeypatch: pytest.MonkeyPatch, weights: list,
                                                            engine: str) -> None:
    used = []
    for name in ("Rounds", "Chunks"):
        cls = getattr(maglev_fill, name)
        monkeypatch.setattr(cls, "run", lambda self, run=cls.run, name=name: used.append(name) or run(self))
    n, size = len(weights), 4099
    rng = np.random.default_rng(3)
    slots = maglev_fill.fill(rng.integers(0, size, n), rng.integers(1, size, n), np.array(weights), size)
    assert used == [engine] and np.bincount(slots, minlength=n).min() > 0


def test_a_single_backend_takes_every_slot() -> None:
    assert maglev_fill.fill(np.array([3]), np.array([2]), np.ones(1, np.int64), 7).tolist() == [0] * 7
