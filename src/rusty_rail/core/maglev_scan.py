"""What both fills of Pseudocode 1 share (maglev_fill.py): the claim array and the list scan.

`claim[s]` is the turn that holds slot s (Eisenbud et al., NSDI 2016, section 3.4: turn t is backend
t % N's in a unit-weight round), UNCLAIMED while it is empty.
"""

from __future__ import annotations

import numpy as np

UNCLAIMED = np.int32(2**31 - 1)   # claim time of an empty slot; turn times are < M < 2**31


def modinv(a: np.ndarray, m: int) -> np.ndarray:
    """a^(m-2) mod m elementwise: the inverse of each skip, m prime (products fit in int64)."""
    result, base, e = np.ones_like(a), a % m, m - 2
    while e:
        if e & 1:
            result = result * base % m
        base = base * base % m
        e >>= 1
    return result


class FillState:
    """Shared state: `claim[s]` is the turn that holds slot s (tentatively, during a step)."""

    BLOCK = 24576  # elements per scan block: temporaries stay small (no page faults, cache resident)

    def __init__(self, offset: np.ndarray, skip: np.ndarray, weights: np.ndarray, size: int) -> None:
        self.M, self.N = size, len(offset)
        self.offset, self.skip, self.w = offset, skip, weights
        self.W = int(weights.sum())
        self.claim = np.full(size, UNCLAIMED, np.int32)
        # a block of k steps must not overflow int32: (M - 1) * k < 2**31
        self.kmax = max(1, min(self.BLOCK, (2**31 - 1) // size - 1))
        self.steps = np.arange(self.kmax + 1, dtype=np.int32)[:, None]
        self.cols = np.arange(max(self.N, self.BLOCK), dtype=np.intp)
        self._inverse: np.ndarray | None = None

    def inverse(self) -> np.ndarray:
        if self._inverse is None:
            self._inverse = modinv(self.skip, self.M)
        return self._inverse

    def positions(self, free: np.ndarray, cur: np.ndarray, backends: np.ndarray) -> np.ndarray:
        """(rows, free): where each free slot stands in the list of each row's backend (`backends`),
        counted from that row's pointer `cur`: (s - cur) * skip^-1 mod M."""
        pos = free - cur[:, None].astype(np.int64, copy=False)
        pos += self.M
        pos *= self.inverse()[backends, None]
        pos -= pos // self.M * self.M
        return pos

    def first_open(self, skip: np.ndarray, start: np.ndarray, before: np.ndarray, k: int,
                   go_on: bool = True) -> np.ndarray:
        """Per row: the first slot of start, start + skip, ... whose claim time is >= `before`
        (empty, or held by a later turn), k steps at a time (int32 arrays). With go_on False, a row
        with none within k steps gets the last slot it looked at (held by an earlier turn)."""
        k = min(k, self.kmax)
        cols = max(1, self.BLOCK // k)
        if len(start) <= cols:
            return self._first_open(skip, start, before, k, go_on)
        out = np.empty(len(start), np.int32)
        for c in range(0, len(start), cols):
            part = slice(c, c + cols)
            out[part] = self._first_open(skip[part], start[part], before[part], k, go_on)
        return out

    def _first_open(self, skip: np.ndarray, start: np.ndarray, before: np.ndarray, k: int,
                    go_on: bool) -> np.ndarray:
        M, n = self.M, len(start)
        slots = skip * self.steps[:k]
        slots += start
        slots -= slots // M * M
        ok = self.claim.take(slots) >= before
        at = ok.argmax(0) * n  # flat index of each column's first open slot
        at += self.cols[:n]
        out = slots.take(at)
        hit = ok.take(at)
        if not hit.all():
            # no open slot within k steps: go on from the block's end with longer blocks
            miss = (~hit).nonzero()[0]
            last = slots[-1].take(miss)
            if not go_on:
                out[miss] = last
                return out
            sk = skip.take(miss)
            last += sk
            last %= M
            out[miss] = self.first_open(sk, last, before.take(miss), 4 * k)
        return out
