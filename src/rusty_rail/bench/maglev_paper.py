"""The Maglev table in the paper's terms (Eisenbud et al., NSDI 2016, section 5.3): balance and disruption.

The paper evaluates its consistent hashing on two properties, against N backends and table size M:
- load balancing: how evenly the M entries are spread over the backends. Reported here as the ratio of
  the most to the fewest entries any backend holds (max/min) and of the most to the average (max/avg,
  the paper's measure of the busiest backend's excess);
- resilience to backend changes: the fraction of table entries whose backend changes when backends
  fail at once (the paper's figure plots it against the percentage of backends removed, N = 1000, for
  M = 65537 and 655373). Here also for one backend leaving or joining, against N, beside the minimum
  any scheme must move (the leaver's own entries, about M/N; a joiner takes about M/(N+1)).

Everything is computed with the production build (rusty_rail.core.maglev.build_table) on addresses
10.64.0.1 onwards; no timing, so the figures are exact and machine-independent.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import Any

import numpy as np

from ..core import maglev

SIZES = (65537, 655373)
"""M: the paper's "small" and "large" tables."""
BACKEND_COUNTS = (10, 50, 100, 200, 500, 1000, 2000, 5000)
FAILURE_PERCENTS = (1, 2, 5, 10, 15, 20)
PAPER_N = 1000


def addresses(n: int, first: str = "10.64.0.1") -> list[IPv4Address]:
    return [IPv4Address(int(IPv4Address(first)) + i) for i in range(n)]


def _owners(table: maglev.MaglevTable) -> np.ndarray:
    """slot -> the backend's address as an integer (tables of different sets compared by address)."""
    return np.array([int(b) for b in table.backends], np.int64)[table.slots]


def balance(n: int, size: int) -> dict[str, float]:
    counts = np.array(maglev.build_table(addresses(n), size).slot_counts())
    return {"max": int(counts.max()), "min": int(counts.min()), "max_over_min": float(counts.max() / counts.min()),
            "max_over_avg": float(counts.max() / (size / n))}


def changed(before: maglev.MaglevTable, after: maglev.MaglevTable) -> float:
    """Fraction of slots whose backend differs between two tables of the same size."""
    return float(np.mean(_owners(before) != _owners(after)))


def one_change(n: int, size: int, rng: random.Random) -> dict[str, float]:
    backends = addresses(n)
    full = maglev.build_table(backends, size)
    leaver = rng.choice(backends)
    left = maglev.build_table([b for b in backends if b != leaver], size)
    joined = maglev.build_table([*backends, IPv4Address("10.65.0.1")], size)
    return {"leave": changed(full, left), "leave_minimum": full.slot_counts()[full.backends.index(leaver)] / size,
            "join": changed(full, joined), "join_minimum": 1 / (n + 1)}


def failures(size: int, n: int, percents: Sequence[int], rng: random.Random) -> dict[int, float]:
    """Fraction of entries changed when percents% of n backends fail at once (the paper's figure)."""
    backends = addresses(n)
    full = maglev.build_table(backends, size)
    out = {}
    for pct in percents:
        gone = set(rng.sample(backends, max(1, n * pct // 100)))
        out[pct] = changed(full, maglev.build_table([b for b in backends if b not in gone], size))
    return out


def run(sizes: Sequence[int] = SIZES, counts: Sequence[int] = BACKEND_COUNTS,
        percents: Sequence[int] = FAILURE_PERCENTS, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)  # which backends leave: fixed, so a rerun gives the same figures
    out: dict[str, Any] = {"benchmark": "maglev_paper", "sizes": list(sizes), "counts": list(counts),
                           "balance": {}, "one_change": {}, "failures": {}}
    for size in sizes:
        out["balance"][size] = {n: balance(n, size) for n in counts}
        out["one_change"][size] = {n: one_change(n, size, rng) for n in counts}
        out["failures"][size] = failures(size, PAPER_N, percents, rng)
    return out
