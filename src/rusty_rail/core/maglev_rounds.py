"""Unit-weight pools, round after round (maglev_fill.py): deferred acceptance with turn times as
priorities, small pools in stages of many rounds, the last turns one by one on the position matrix."""

from __future__ import annotations

import numpy as np

from rusty_rail.core.maglev_scan import UNCLAIMED, FillState


class Rounds(FillState):
    """Unit weights: rounds by deferred acceptance (small pools: many rounds at a stage), then the
    last round's last turns one by one on the position matrix."""

    HIT = 2.0              # scan block = HIT expected gaps between empty slots
    PY_PROBES = 64         # moving turns whose scans take about this many probes: finished in Python
    TAIL = 256             # the last round's last turns (at most) go one by one on the position matrix
    CANDIDATES = 16        # ... each with its nearest this many empty slots at hand
    CELLS = 8192           # ... from position matrices of this many entries at a time
    LAST_ROUND_STEP = 0.5  # in the last round, DA handles this share of the slots left at a time

    STAGE_BREADTH = 64     # rounds go in stages of sqrt(64 M) turns at most (collisions grow with
    STAGE_SHARE = 30       # turns**2 / M), a 30th of the table at most ...
    STAGE_ROUNDS = 10, 20  # ... of this many rounds (pools of 204 or fewer at M = 65537, 647 at 655373)
    STAGE_FILL = 0.98      # ... while the table is less full than this
    STAGE_PY = 16          # a stage's last losing turns (at most) go one at a time
    STAGE_SPARE = 10       # list entries per backend beyond its turns (for losses: 8 seen at most)

    def run(self) -> np.ndarray:
        M, N = self.M, self.N
        self.skip32 = self.skip.astype(np.int32)
        tail = min(M % N or N, self.TAIL)
        t = 0
        self.cur = self.offset.astype(np.int32)  # each backend's next position, as a slot
        fewest, most = self.STAGE_ROUNDS
        rounds = min(most, min(int((self.STAGE_BREADTH * M) ** 0.5), M // self.STAGE_SHARE) // N)
        staged = min(self.STAGE_FILL * M, M - N - tail) if rounds >= fewest else 0
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
                    claim[cand] = UNCLAIMED
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
                claim[cand] = UNCLAIMED  # undo: every candidate was empty at t0
                return False
            who = turn.take(movers)
            base = at_first.take(movers)
            was = cand.take(base + old)
            claim[was[claim.take(was) == who]] = UNCLAIMED  # left behind; a predecessor takes it
            new = cand.take(base + new_rank)
            held = claim.take(new)
            np.minimum.at(claim, new, who)
            won = claim.take(new) == who
            displaced = held[won & (held != UNCLAIMED)] - t0  # r * N + i
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
        free = self.claim.take(at) == UNCLAIMED
        count = free.sum(1, dtype=np.int32)
        cand = at.ravel().take(np.flatnonzero(free))
        short = np.flatnonzero(count < need)
        if len(short) and steps < M:
            start = at[short, -1] + self.skip32.take(short)
            start %= M
            more = self._list_block(self.skip32.take(short), start, min(self.kmax, M - steps, 8 * steps))
            more_free = self.claim.take(more) == UNCLAIMED
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
        N, claim, empty = self.N, self.claim, int(UNCLAIMED)
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
            displaced = held[(held != UNCLAIMED) & ~lost] - t0
            moving = np.concatenate((moving[lost], displaced))
            k *= 2
        slot += skip
        slot %= M
        self.cur[i0:i0 + n] = slot

    def finish(self, moving: np.ndarray, slot: np.ndarray, skip: np.ndarray, t0: int) -> None:
        """The round's last moving turns by deferred acceptance one at a time: for a few turns a plain
        loop costs less than the numpy calls of a vectorised step."""
        M, claim, empty = self.M, self.claim, int(UNCLAIMED)
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

    def last_turns(self, t0: int) -> None:
        """Turns t0 .. M-1 (backends i0.., one turn each; as many as empty slots) one after another
        on the matrix of the empty slots' positions relative to each backend's pointer: each turn
        takes its least-position slot not yet taken. numpy sorts each row's slots by position; the
        loop over turns is plain Python, a few list steps per turn, from the CANDIDATES nearest
        (the rest of the row only when those are all taken)."""
        M = self.M
        n = M - t0
        rows = np.arange(t0 % self.N, t0 % self.N + n)
        free = np.flatnonzero(self.claim == UNCLAIMED)
        width = 1 << max(1, (n - 1).bit_length())  # column numbers ride in the low bits of the key
        nearest: list[list[int]] = []
        by_row = []  # each row's columns by position
        block = max(1, self.CELLS // n)  # rows at a time: temporaries stay small (no page faults)
        for r in range(0, n, block):
            part = rows[r:r + block]
            key = self.positions(free, self.cur[part], part)
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
