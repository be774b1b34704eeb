"""The fill of Pseudocode 1 (Eisenbud et al., NSDI 2016, section 3.4) with numpy: slot -> backend.

maglev.py's docstring says why the two computations here are exact (deferred acceptance with turn
times as priorities; the position matrix of the last empty slots). Unit-weight pools of `ROUND_POOL`
backends or more run `_Rounds` (one round at a time, then the position matrix); weighted or small
pools run `_Chunks`.
"""

from __future__ import annotations

import numpy as np

_UNCLAIMED = np.int32(2**31 - 1)   # claim time of an empty slot; turn times are < M < 2**31
ROUND_POOL = 100                   # unit-weight pools this large are filled round by round


def fill(offset: np.ndarray, skip: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """Pseudocode 1 over backends 0..n-1 (weights >= 1) given their offsets and skips: slot -> backend."""
    if len(offset) == 1:
        return np.zeros(size, np.int32)
    unit = bool((weights == 1).all())
    engine = _Rounds if unit and len(offset) >= ROUND_POOL else _Chunks
    claim = engine(offset, skip, weights, size).run()
    # a slot's claim time is the turn that filled it; turn -> backend is the round's layout
    within = claim % int(weights.sum())
    if unit:
        return within
    return np.searchsorted(np.cumsum(weights), within, side="right").astype(np.int32)


def _modinv(a: np.ndarray, m: int) -> np.ndarray:
    """a^(m-2) mod m elementwise: the inverse of each skip, m prime (products fit in int64)."""
    result, base, e = np.ones_like(a), a % m, m - 2
    while e:
        if e & 1:
            result = result * base % m
        base = base * base % m
        e >>= 1
    return result


class _Fill:
    """Shared state: `claim[s]` is the turn that holds slot s (tentatively, during a step)."""

    BLOCK = 24576  # elements per scan block: temporaries stay small (no page faults, cache resident)

    def __init__(self, offset: np.ndarray, skip: np.ndarray, weights: np.ndarray, size: int) -> None:
        self.M, self.N = size, len(offset)
        self.offset, self.skip, self.w = offset, skip, weights
        self.W = int(weights.sum())
        self.claim = np.full(size, _UNCLAIMED, np.int32)
        # a block of k steps must not overflow int32: (M - 1) * k < 2**31
        self.kmax = max(1, min(self.BLOCK, (2**31 - 1) // size - 1))
        self.steps = np.arange(self.kmax + 1, dtype=np.int32)[:, None]
        self.cols = np.arange(max(self.N, self.BLOCK), dtype=np.intp)
        self._inverse: np.ndarray | None = None

    def inverse(self) -> np.ndarray:
        if self._inverse is None:
            self._inverse = _modinv(self.skip, self.M)
        return self._inverse

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


class _Rounds(_Fill):
    """Unit weights: one round at a time by deferred acceptance, the last turns on the position matrix."""

    HIT = 2.0              # scan block = HIT expected gaps between empty slots
    PY_PROBES = 64         # moving turns whose scans take about this many probes: finished in Python
    TAIL = 256             # the last round's last turns (at most) go one by one on the position matrix
    CANDIDATES = 16        # ... each with its nearest this many empty slots at hand
    CELLS = 8192           # ... from position matrices of this many entries at a time
    LAST_ROUND_STEP = 0.5  # in the last round, DA handles this share of the slots left at a time

    STAGE_TURNS = 2000     # rounds go in stages of about this many turns (a 30th of the table at
    STAGE_SHARE = 30       # most: collisions grow with turns**2 / M) ...
    STAGE_ROUNDS = 10      # ... when that makes this many rounds at least (pools of 200 or fewer)
    STAGE_FILL = 0.98      # ... while the table is less full than this
    STAGE_PY = 48          # a stage's last losing turns (at most) go one at a time
    STAGE_SPARE = 10       # list entries per backend beyond its turns (for losses: 8 seen at most)

    def run(self) -> np.ndarray:
        M, N = self.M, self.N
        self.skip32 = self.skip.astype(np.int32)
        tail = min(M % N or N, self.TAIL)
        t = 0
        self.cur = self.offset.astype(np.int32)  # each backend's next position, as a slot
        rounds = min(self.STAGE_TURNS, M // self.STAGE_SHARE) // N
        staged = min(self.STAGE_FILL * M, M - N - tail) if rounds >= self.STAGE_ROUNDS else 0
        retry = 0  # after a stage that could not be done, the next try is a stage's length later
        while t < M - tail:
            if retry <= t < staged - rounds * N and t % N == 0:
                if self.stage(t, rounds):
                    t += rounds * N
                    continue
                retry = t + rounds * N
            n = min(N - t % N, M - tail - t)
            if M - t <= N:  # last round: many collisions, so shorter steps keep cascades short
                n = min(n, max(1, int(self.LAST_ROUND_STEP * (M - t))))
            self.round(t, n)
            t += n
        if t < M:
            self.last_turns(t)
        return self.claim

    def stage(self, t0: int, rounds: int) -> bool:
        """Rounds t0 / N .. + rounds - 1 together, by deferred acceptance over each backend's list of
        the slots empty at t0: turn (i, r) proposes to i's entries from the r-th on. A turn that
        loses moves one entry on and pushes the backend's later turns along (a backend's turns hold
        entries in order; each old slot falls to the predecessor). False, with nothing changed, when
        a list turns out too short: the caller then goes round by round."""
        M, N, claim = self.M, self.N, self.claim
        cand, count = self.stage_lists(rounds + self.STAGE_SPARE, (M - t0) / M)
        if count.min() < rounds:
            return False
        first = np.cumsum(count, dtype=np.int32) - count  # where backend i's entries begin in `cand`
        # rank[i, r]: the entry turn (i, r) proposes to; turn (i, r) is t0 + r * N + i
        order = np.arange(rounds, dtype=np.int32)
        rank = np.repeat(order[None, :], N, 0)
        flat = rank.ravel()
        at_first = np.repeat(first, rounds)
        limit = np.repeat(count, rounds)
        turn = (order * N + t0)[None, :] + np.arange(N, dtype=np.int32)[:, None]
        turn = turn.ravel()
        slot = cand.take(at_first + flat)
        np.minimum.at(claim, slot, turn)
        lost = np.flatnonzero(claim.take(slot) != turn)
        touched = np.zeros(N, bool)
        while len(lost):
            if len(lost) <= self.STAGE_PY:
                if not self.stage_finish(lost.tolist(), rank.ravel(), cand, first, count, t0, rounds):
                    claim[cand] = _UNCLAIMED
                    return False
                break
            touched[lost // rounds] = True
            rows = np.flatnonzero(touched)
            touched[rows] = False
            before = rank.take(rows, 0)
            flat[lost] += 1
            # a backend's turns hold increasing entries: push the later ones along
            after = rank.take(rows, 0) - order
            np.maximum.accumulate(after, axis=1, out=after)
            after += order
            rank[rows] = after
            r_at, c_at = np.nonzero(after != before)
            movers = rows.take(r_at) * rounds + c_at
            old, new_rank = before[r_at, c_at], after[r_at, c_at]
            if (new_rank >= limit.take(movers)).any():
                claim[cand] = _UNCLAIMED  # undo: every candidate was empty at t0
                return False
            who = turn.take(movers)
            base = at_first.take(movers)
            was = cand.take(base + old)
            claim[was[claim.take(was) == who]] = _UNCLAIMED  # left behind; a predecessor takes it
            new = cand.take(base + new_rank)
            held = claim.take(new)
            np.minimum.at(claim, new, who)
            won = claim.take(new) == who
            displaced = held[won & (held != _UNCLAIMED)] - t0  # r * N + i
            lost = np.concatenate((movers[~won], displaced % N * rounds + displaced // N))
        last = cand.take(first + rank[:, -1])
        np.add(last, self.skip32, out=self.cur)
        self.cur %= M
        return True

    def stage_lists(self, need: int, left: float) -> tuple[np.ndarray, np.ndarray]:
        """Each backend's next empty slots in list order, backend after backend, and how many each
        has: about `need` (with 3 sigma to spare when `left` of the slots are empty), more for a
        backend whose next entries are mostly taken (one walking just behind another, say)."""
        M, N = self.M, self.N
        # a list has M distinct entries: steps beyond those would come round again
        steps = min(self.kmax, M, int((need + 3 * (need * (1 - left)) ** 0.5) / left) + 1)
        at = self._list_block(self.skip32, self.cur, steps)
        free = self.claim.take(at) == _UNCLAIMED
        count = free.sum(1, dtype=np.int32)
        cand = at.ravel().take(np.flatnonzero(free))
        short = np.flatnonzero(count < need)
        if len(short) and steps < M:
            start = at[short, -1] + self.skip32.take(short)
            start %= M
            more = self._list_block(self.skip32.take(short), start, min(self.kmax, M - steps, 8 * steps))
            more_free = self.claim.take(more) == _UNCLAIMED
            owner = np.concatenate((np.repeat(np.arange(N), count), np.repeat(short, more_free.sum(1))))
            cand = np.concatenate((cand, more.ravel().take(np.flatnonzero(more_free))))
            cand = cand.take(np.argsort(owner, kind="stable"))  # each backend's entries together, in order
            count = np.bincount(owner, minlength=N).astype(np.int32)
        return cand, count

    def _list_block(self, skip: np.ndarray, start: np.ndarray, steps: int) -> np.ndarray:
        """(rows, steps): start, start + skip, ... mod M per row (int32: (M - 1) * steps < 2**31)."""
        at = skip[:, None] * self.steps[:steps, 0]
        at += start[:, None]
        at -= at // self.M * self.M
        return at

    def stage_finish(self, stack: list, rank: np.ndarray, cand: np.ndarray, first: np.ndarray,
                     count: np.ndarray, t0: int, rounds: int) -> bool:
        """A stage's last losing turns by deferred acceptance one at a time, one entry after another
        (an earlier turn of the same backend reaching a later one's entry displaces it)."""
        N, claim, empty = self.N, self.claim, int(_UNCLAIMED)
        while stack:
            q = stack.pop()
            i, r = divmod(q, rounds)
            who, base, end = t0 + r * N + i, int(first[i]), int(count[i])
            k = int(rank[q]) + 1
            while True:
                if k >= end:
                    return False
                s = int(cand[base + k])
                held = int(claim[s])
                if held >= who:
                    break
                k += 1
            claim[s], rank[q] = who, k
            if held != empty:
                d = held - t0
                stack.append(d % N * rounds + d // N)
        return True

    def round(self, t0: int, n: int) -> None:
        """Turns t0 .. t0+n-1, i.e. backends i0 .. i0+n-1 of one round (the turn is the priority)."""
        M, claim = self.M, self.claim
        i0 = t0 % self.N
        skip = self.skip32[i0:i0 + n]
        k = int(self.HIT * M / (M - t0)) + 1
        turn = np.arange(t0, t0 + n, dtype=np.int32)
        # a turn with no open slot within k steps proposes to the last slot it saw, whose earlier
        # holder keeps it: it goes on with the turns that lose, in one scan with them
        slot = self.first_open(skip, self.cur[i0:i0 + n], turn, k, go_on=False)
        np.minimum.at(claim, slot, turn)
        moving = (claim.take(slot) < turn).nonzero()[0]
        probes = M / (M - t0)  # list entries a moving turn looks at, about
        while len(moving):
            if len(moving) * probes <= self.PY_PROBES:
                self.finish(moving, slot, skip, t0)
                break
            # rejected turns propose further down their lists; a proposal that wins may displace a
            # later turn of this round, which then moves on as well
            sk, who = skip.take(moving), turn.take(moving)
            start = slot.take(moving) + sk
            start %= M
            new = self.first_open(sk, start, who, k, go_on=False)
            slot[moving] = new
            held = claim.take(new)
            np.minimum.at(claim, new, who)
            lost = claim.take(new) < who
            displaced = held[(held != _UNCLAIMED) & ~lost] - t0
            moving = np.concatenate((moving[lost], displaced))
            k *= 2
        slot += skip
        slot %= M
        self.cur[i0:i0 + n] = slot

    def finish(self, moving: np.ndarray, slot: np.ndarray, skip: np.ndarray, t0: int) -> None:
        """The round's last moving turns by deferred acceptance one at a time: for a few turns a plain
        loop costs less than the numpy calls of a vectorised step."""
        M, claim, empty = self.M, self.claim, int(_UNCLAIMED)
        stack = moving.tolist()
        while stack:
            i = stack.pop()
            who, step = t0 + i, int(skip[i])
            s = int(slot[i]) + step
            s -= M if s >= M else 0
            while (held := int(claim[s])) < who:  # held by an earlier turn: look further
                s += step
                s -= M if s >= M else 0
            claim[s], slot[i] = who, s
            if held != empty:  # displaced a later turn of this round: it moves on
                stack.append(held - t0)

    def positions(self, free: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(rows, free): where each free slot stands in each row's list, counted from its pointer:
        (s - cur) * skip^-1 mod M."""
        pos = free - self.cur[rows, None].astype(np.int64)
        pos += self.M
        pos *= self.inverse()[rows, None]
        pos -= pos // self.M * self.M
        return pos

    def last_turns(self, t0: int) -> None:
        """Turns t0 .. M-1 (backends i0.., one turn each; as many as empty slots) one after another
        on the matrix of the empty slots' positions relative to each backend's pointer: each turn
        takes its least-position slot not yet taken. numpy sorts each row's slots by position; the
        loop over turns is plain Python, a few list steps per turn, from the CANDIDATES nearest
        (the rest of the row only when those are all taken)."""
        M = self.M
        n = M - t0
        rows = np.arange(t0 % self.N, t0 % self.N + n)
        free = np.flatnonzero(self.claim == _UNCLAIMED)
        width = 1 << max(1, (n - 1).bit_length())  # column numbers ride in the low bits of the key
        nearest: list[list[int]] = []
        by_row = []  # each row's columns by position
        block = max(1, self.CELLS // n)  # rows at a time: temporaries stay small (no page faults)
        for r in range(0, n, block):
            key = self.positions(free, rows[r:r + block])
            key *= width
            key += self.cols[:n]
            key.sort(1)
            key &= width - 1
            nearest += key[:, :self.CANDIDATES].tolist()
            by_row += list(key)
        seen = bytearray(n)
        choice = []
        for turn, candidates in enumerate(nearest):
            for c in candidates:
                if not seen[c]:
                    break
            else:  # all taken: the rest of the row
                for c in by_row[turn][self.CANDIDATES:].tolist():
                    if not seen[c]:
                        break
            seen[c] = 1
            choice.append(c)
        slot = free[choice]
        self.claim[slot] = np.arange(t0, M, dtype=np.int32)
        self.cur[rows] = (slot + self.skip[rows]) % M

class _Chunks(_Fill):
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
            pos = free - ck["cur"][rows][:, None]
            pos += M
            pos *= self.inverse()[ck["backend"][rows]][:, None]
            pos %= M
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
            self.free = np.flatnonzero(claim == _UNCLAIMED)
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
            displaced = (now < held) & (held != _UNCLAIMED)
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
        own = (phase >= bg) & (phase < bg + wg) & (held >= t0) & (held != _UNCLAIMED)
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
