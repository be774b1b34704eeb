"""Pools of any weights (maglev_fill.py): deferred acceptance over chunks of turns, a backend's turns
going down one list in order (a running count along each list, iterated to its fixed point)."""

from __future__ import annotations

import numpy as np

from rusty_rail.core.maglev_scan import UNCLAIMED, FillState


class Chunks(FillState):
    """Any weights: deferred acceptance over chunks of turns, with ragged per-backend slot lists."""

    SHARE = 0.15     # a chunk takes this share of the slots left (up to CAP turns)
    CAP = 12000
    SPARE = 1.5      # extra list entries per backend, beyond its turns and expected rejections

    def run(self) -> np.ndarray:
        self.wend = np.cumsum(self.w)
        self.base, self.cur = self.wend - self.w, self.offset.copy()
        self.index, self.free = np.full(self.N, -1, np.int64), None
        t = 0
        while t < self.M:
            n = max(1, min(self.M - t, int(self.SHARE * (self.M - t)), self.CAP))
            self.chunk(t, t + n)
            t += n
        return self.claim

    def turns_before(self, t: np.ndarray | int, w: np.ndarray, base: np.ndarray) -> np.ndarray:
        """How many turns of each backend come before turn t (t may be per row)."""
        return t // self.W * w + np.minimum(np.maximum(t % self.W - base, 0), w)

    def lists(self, rows: np.ndarray, lo: np.ndarray, k: np.ndarray, ck: dict) -> tuple[np.ndarray, ...]:
        """Open slots (at the chunk's start) among steps lo .. lo+k of each row's list, in (row, step)
        order: by walking, or from the positions of all open slots when that is cheaper."""
        M, total = self.M, int(k.sum())
        free = self.free
        if free is not None and total > 2 * len(rows) * len(free):
            pos = self.positions(free, ck["cur"][rows], ck["backend"][rows])
            r, c = np.nonzero((pos >= lo[:, None]) & (pos < (lo + k)[:, None]))
            key = np.sort((r * M + pos[r, c]) * len(free) + c)
            return free[key % len(free)], rows[key // len(free) // M]
        ends = np.cumsum(k)
        row = np.repeat(rows, k)
        step = np.arange(total) + np.repeat(lo - (ends - k), k)
        slot = ck["cur"][row] + ck["skip"][row] * step
        slot %= M
        keep = np.flatnonzero(self.claim[slot] >= ck["t0"])
        return slot[keep], row[keep]

    def chunk(self, t0: int, t1: int) -> None:
        M, W, claim = self.M, self.W, self.claim
        done = self.turns_before(t0, self.w, self.base)
        count = self.turns_before(t1, self.w, self.base) - done
        play = np.flatnonzero(count)
        n = len(play)
        self.index[play] = np.arange(n)
        cb, db, wb, bb = count[play], done[play], self.w[play], self.base[play]
        ck = {"cur": self.cur[play], "skip": self.skip[play], "backend": play, "t0": t0}
        left = M - t0
        if 4 * left < M:  # few slots left: lists may come from the open slots' positions
            self.free = np.flatnonzero(claim == UNCLAIMED)
        k = ((cb * (1 + (t1 - t0) / left) + self.SPARE) * (M / left)).astype(np.int64) + 1
        walked = k.copy()
        slot, seg = self.lists(np.arange(n), np.zeros(n, np.int64), k, ck)
        cnt = np.bincount(seg, minlength=n)
        s0 = np.cumsum(cnt) - cnt
        take = np.zeros(len(slot), bool)
        dirty: np.ndarray | None = None
        while True:
            if dirty is None:  # first pass: nothing is held yet, every row takes its first entries
                idx, g = None, seg
                nth = np.arange(len(slot)) - s0[seg]
                tk = nth < cb[seg]
            else:
                lens = cnt[dirty]
                ends = np.cumsum(lens)
                first = np.repeat(ends - lens, lens)
                idx = np.arange(int(ends[-1])) + np.repeat(s0[dirty], lens) - first
                g = seg[idx]
                tk, nth = self._takes(claim[slot[idx]], g, first, cb, db, wb, bb, t0)
            ti = np.flatnonzero(tk)
            pg = g[ti]
            rows = np.arange(n) if dirty is None else dirty
            short = rows[np.bincount(pg, minlength=n)[rows] < cb[rows]]
            if len(short):  # a list ran out: walk further for those rows and look again
                more = np.maximum(walked[short], 16)
                es, eg = self.lists(short, walked[short], more, ck)
                walked[short] += more
                slot, seg, take, cnt, s0 = _merge(slot, seg, take, cnt, es, eg, n)
                dirty = rows
                continue
            if idx is None:
                take, pi = tk, ti
            else:
                take[idx], pi = tk, idx[ti]
            g_turn = db[pg] + nth[ti]
            turn = (g_turn // wb[pg] * W + bb[pg] + g_turn % wb[pg]).astype(np.int32)
            won = slot[pi]
            held = claim[won]
            np.minimum.at(claim, won, turn)
            now = claim[won]
            mark = np.zeros(n, bool)
            mark[pg[turn > now]] = True
            displaced = (now < held) & (held != UNCLAIMED)
            if displaced.any():
                old_b = np.searchsorted(self.wend, held[displaced] % W, side="right")
                new_b = np.searchsorted(self.wend, now[displaced] % W, side="right")
                mark[self.index[old_b[old_b != new_b]]] = True
            dirty = np.flatnonzero(mark)
            if len(dirty) == 0:
                break
        pi = np.flatnonzero(take)
        last = pi[np.r_[seg[pi][1:] != seg[pi][:-1], True]]
        self.cur[play[seg[last]]] = (slot[last] + ck["skip"][seg[last]]) % M
        self.index[play] = -1

    def _takes(self, held: np.ndarray, g: np.ndarray, first: np.ndarray, cb: np.ndarray,
               db: np.ndarray, wb: np.ndarray, bb: np.ndarray, t0: int) -> tuple[np.ndarray, np.ndarray]:
        """Which list entries a row's turns take, given the current claims: its k-th turn takes the
        first entry after its (k-1)-th whose holder is later than it (or is itself)."""
        W = self.W
        wg, bg, cbg = wb[g], bb[g], cb[g]
        # turns of this row before the holder's turn (entries held before the chunk: none)
        ahead = self.turns_before(held, wg, bg) - db[g]
        phase = held % W
        own = (phase >= bg) & (phase < bg + wg) & (held >= t0) & (held != UNCLAIMED)
        free = (ahead >= cbg) | own
        some = (ahead > 0) & ~free  # usable by the row's earlier turns only
        nth = _running_count(free, first)
        if some.any():
            while True:  # count = entries taken before; converges (see _running_count)
                tk = free | (some & (nth < ahead))
                again = _running_count(tk, first)
                if np.array_equal(again, nth):
                    break
                nth = again
            return tk & (nth < cbg), nth
        return free & (nth < cbg), nth


def _running_count(x: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Per segment (first[i] = index where i's segment starts): how many x are true before i.

    Iterating count -> running_count(takes(count)) alternates between lower and upper bounds of the
    sequential count and fixes one more entry of each segment per step, so it ends at the exact one."""
    c = np.cumsum(x)
    c -= x
    return c - c[first]


def _merge(slot: np.ndarray, seg: np.ndarray, take: np.ndarray, cnt: np.ndarray, es: np.ndarray,
           eg: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """Append entries (es, eg) to the ends of their rows' lists, keeping rows contiguous."""
    ecnt = np.bincount(eg, minlength=n)
    ncnt = cnt + ecnt
    ns0 = np.cumsum(ncnt) - ncnt
    s0 = np.cumsum(cnt) - cnt
    old_at = ns0[seg] + (np.arange(len(slot)) - s0[seg])
    e0 = np.cumsum(ecnt) - ecnt
    new_at = ns0[eg] + cnt[eg] + (np.arange(len(es)) - e0[eg])
    size = len(slot) + len(es)
    out_slot = np.empty(size, slot.dtype)
    out_seg = np.empty(size, seg.dtype)
    out_take = np.zeros(size, bool)
    out_slot[old_at], out_slot[new_at] = slot, es
    out_seg[old_at], out_seg[new_at] = seg, eg
    out_take[old_at] = take
    return out_slot, out_seg, out_take, ncnt, ns0
