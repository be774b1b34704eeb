"""Maglev lookup tables: Eisenbud et al., NSDI 2016, section 3.4, Pseudocode 1, built with numpy.

Tables are built here only; data planes receive the finished slots. Every balancer that builds a table
from the same backend set gets the same table: backends are put in a canonical order (IPv4 before IPv6,
then numeric address) and `offset`/`skip` come from fixed, keyed BLAKE2b hashes of the packed address,
never from Python's per-process hash().

The table is exactly Pseudocode 1's (tests/oracle.py has the literal transcription). The paper's loop
is a sequence of *turns*: round after round, backend i takes w_i consecutive turns (weight 0: none),
and a turn claims the first still-empty slot of i's preference list `(offset + j * skip) mod M`. The
loop is sequential, so it is computed here in two exact ways, turn times standing for priorities:

* Deferred acceptance (Gale-Shapley). Seen from the slots, the fill is a serial dictatorship: every
  turn picks its best free slot, earlier turns first. Its result is the unique stable matching of
  turns to slots when every slot prefers earlier turns, and deferred acceptance finds that matching
  in any proposal order: each turn proposes to its next slot, a slot keeps the earliest proposer (an
  array of claim times and `np.minimum.at`), and rejected turns propose further down their list. In
  one round most proposals do not collide, so a round costs a few vectorised passes.
* A backend's pointer never passes an empty slot (it stops at the first one), so once few slots are
  left a backend's next claim is the empty slot of least position `((s - offset) * skip^-1) mod M`
  (M is prime); the last turns are resolved on that small (turns x empty slots) matrix.

Unit weights with many backends use rounds (`_Rounds`); weighted or small pools use `_Chunks`, which
runs deferred acceptance over chunks of many turns at once: a backend's turns go down one list in
order, each taking the first slot after its predecessor's that no earlier turn holds (a running count
along each list, iterated to its fixed point).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

import numpy as np

from rusty_rail.core.constants import DEFAULT_TABLE_SIZE

_OFFSET_KEY = b"rusty-rail/maglev/offset"
_SKIP_KEY = b"rusty-rail/maglev/skip"
_UNCLAIMED = np.int32(2**31 - 1)   # claim time of an empty slot; turn times are < M < 2**31
_ROUND_POOL = 100                  # unit-weight pools this large are filled round by round

Backend = IPv4Address | IPv6Address
BackendLike = IPv4Address | IPv6Address | str | int


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _h(key: bytes, name: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(name, key=key, digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=1 << 16)
def permutation_params(backend: Backend, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's preference list, `(offset + j * skip) mod size`.

    Cached per (backend, size): a rebuild after one backend changes hashes only that backend."""
    name = backend.packed
    return _h(_OFFSET_KEY, name) % size, _h(_SKIP_KEY, name) % (size - 1) + 1


def _address(backend: BackendLike) -> Backend:
    if isinstance(backend, (IPv4Address, IPv6Address)):
        return backend
    if isinstance(backend, int):
        return IPv4Address(backend)  # a bare number has always meant IPv4
    return ip_address(backend)


def _order(address: Backend) -> tuple[int, int]:
    return address.version, int(address)


def canonical_backends(backends: Iterable[BackendLike]) -> tuple[Backend, ...]:
    """Unique addresses, IPv4 before IPv6, each in numeric order: the order `slots` index into."""
    return tuple(sorted({_address(b) for b in backends}, key=_order))


@dataclass(frozen=True, eq=False)
class MaglevTable:
    backends: tuple[Backend, ...]
    """The backends in canonical order; `slots` index into this."""
    slots: np.ndarray = field(repr=False)
    """Read-only int32 array, slot -> index into `backends`; empty when no backend has a weight."""
    weights: tuple[int, ...]

    def __post_init__(self) -> None:
        slots = np.array(self.slots, dtype=np.int32).reshape(-1)
        slots.flags.writeable = False
        object.__setattr__(self, "slots", slots)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaglevTable):
            return NotImplemented
        return (self.backends == other.backends and self.weights == other.weights
                and np.array_equal(self.slots, other.slots))

    def __hash__(self) -> int:
        return hash((self.backends, self.weights, self.slots.tobytes()))

    def __repr__(self) -> str:  # not 65537 numbers
        return f"MaglevTable(backends={self.backends!r}, weights={self.weights!r}, size={self.size})"

    @property
    def size(self) -> int:
        return len(self.slots)

    def backend_for(self, flow_hash: int) -> Backend | None:
        if not len(self.slots):
            return None
        return self.backends[int(self.slots[flow_hash % len(self.slots)])]

    def slot_counts(self) -> list[int]:
        return np.bincount(self.slots, minlength=len(self.backends)).tolist()


def build_table(
    backends: Iterable[BackendLike],
    size: int = DEFAULT_TABLE_SIZE,
    weights: Mapping[BackendLike, int] | Sequence[int] | None = None,
) -> MaglevTable:
    """Populate a Maglev table (Pseudocode 1), with integer weights as extra turns per round.

    `weights` is a mapping from backend to weight, or a sequence in the order `backends` was given.
    With equal weights each backend takes one turn a round and so gets floor or ceil of size/N slots;
    a backend of weight w takes w turns a round, so shares follow the weights to within one round.
    A backend of weight 0 gets no slots (it stays listed, e.g. while drained).
    """
    if not is_prime(size):
        raise ValueError(f"table size {size} is not prime")
    given = [_address(b) for b in backends]
    ordered = canonical_backends(given)
    if weights is None:
        weight_of = {b: 1 for b in ordered}
    elif isinstance(weights, Mapping):
        weight_of = {_address(b): int(w) for b, w in weights.items()}
        missing = set(ordered) - weight_of.keys()
        if missing:
            raise ValueError(f"no weight for {sorted(map(str, missing))}")
    else:
        if len(weights) != len(given):
            raise ValueError(f"{len(weights)} weights for {len(given)} backends")
        weight_of = {b: int(w) for b, w in zip(given, weights)}
    turns = tuple(weight_of[b] for b in ordered)
    if any(w < 0 for w in turns):
        raise ValueError("weights must be >= 0")
    if not ordered or not any(turns):
        return MaglevTable(ordered, np.zeros(0, np.int32), turns)
    return MaglevTable(ordered, _populate(ordered, turns, size), turns)


def _populate(backends: Sequence[Backend], turns: Sequence[int], size: int) -> np.ndarray:
    """Slot -> index into `backends`, exactly as Pseudocode 1 (with weighted turns) fills it."""
    active = np.flatnonzero(np.array(turns) > 0)
    params = np.array([permutation_params(backends[i], size) for i in active], np.int64).reshape(-1, 2)
    owner = _fill(params[:, 0], params[:, 1], np.array(turns, np.int64)[active], size)
    return active[owner].astype(np.int32)


def _fill(offset: np.ndarray, skip: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """Pseudocode 1 over backends 0..n-1 (weights >= 1) given their offsets and skips: slot -> backend."""
    if len(offset) == 1:
        return np.zeros(size, np.int32)
    unit = bool((weights == 1).all())
    engine = _Rounds if unit and len(offset) >= _ROUND_POOL else _Chunks
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

    def first_open(self, skip: np.ndarray, start: np.ndarray, before: np.ndarray, k: int) -> np.ndarray:
        """Per row: the first slot of start, start + skip, ... whose claim time is >= `before`
        (empty, or held by a later turn), k steps at a time (int32 arrays)."""
        k = min(k, self.kmax)
        cols = max(1, self.BLOCK // k)
        if len(start) <= cols:
            return self._first_open(skip, start, before, k)
        out = np.empty(len(start), np.int32)
        for c in range(0, len(start), cols):
            part = slice(c, c + cols)
            out[part] = self._first_open(skip[part], start[part], before[part], k)
        return out

    def _first_open(self, skip: np.ndarray, start: np.ndarray, before: np.ndarray, k: int) -> np.ndarray:
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
            sk = skip.take(miss)
            resume = slots[-1].take(miss) + sk
            resume %= M
            out[miss] = self.first_open(sk, resume, before.take(miss), 4 * k)
        return out


class _Rounds(_Fill):
    """Unit weights: one round at a time by deferred acceptance, the last turns on the position matrix."""

    HIT = 2.0              # scan block = HIT expected gaps between empty slots
    TAIL = 256             # the last round's last turns (at most) go to the position matrix
    TAIL_STEP = 0.3        # ... in steps of this share of the slots left
    LAST_ROUND_STEP = 0.5  # in the last round, DA handles this share of the slots left at a time

    def run(self) -> np.ndarray:
        M, N = self.M, self.N
        self.cur = self.offset.astype(np.int32)  # each backend's next position, as a slot
        self.skip32 = self.skip.astype(np.int32)
        tail = min(M % N or N, self.TAIL)
        t = 0
        while t < M - tail:
            n = min(N - t % N, M - tail - t)
            if M - t <= N:  # last round: many collisions, so shorter steps keep cascades short
                n = min(n, max(1, int(self.LAST_ROUND_STEP * (M - t))))
            self.round(t, n)
            t += n
        while t < M:
            n = max(1, min(M - t, int(self.TAIL_STEP * (M - t))))
            self.by_position(t, n)
            t += n
        return self.claim

    def round(self, t0: int, n: int) -> None:
        """Turns t0 .. t0+n-1, i.e. backends i0 .. i0+n-1 of one round (the turn is the priority)."""
        M, claim = self.M, self.claim
        i0 = t0 % self.N
        skip = self.skip32[i0:i0 + n]
        k = int(self.HIT * M / (M - t0)) + 1
        turn = np.arange(t0, t0 + n, dtype=np.int32)
        slot = self.first_open(skip, self.cur[i0:i0 + n], turn, k)
        np.minimum.at(claim, slot, turn)
        moving = (claim.take(slot) < turn).nonzero()[0]
        while len(moving):
            # rejected turns propose further down their lists; a proposal that wins may displace a
            # later turn of this round, which then moves on as well
            sk, who = skip.take(moving), turn.take(moving)
            start = slot.take(moving) + sk
            start %= M
            new = self.first_open(sk, start, who, k)
            slot[moving] = new
            held = claim.take(new)
            np.minimum.at(claim, new, who)
            lost = claim.take(new) < who
            displaced = held[(held != _UNCLAIMED) & ~lost] - t0
            moving = np.concatenate((moving[lost], displaced))
        slot += skip
        slot %= M
        self.cur[i0:i0 + n] = slot

    def by_position(self, t0: int, n: int) -> None:
        """Turns t0 .. t0+n-1 (backends i0.., one turn each) on the matrix of the empty slots'
        positions relative to each backend's pointer: each turn wants its least-position slot."""
        M = self.M
        rows = np.arange(t0 % self.N, t0 % self.N + n)
        free = np.flatnonzero(self.claim == _UNCLAIMED)
        pos = free - self.cur[rows, None].astype(np.int64)
        pos += M
        pos *= self.inverse()[rows, None]
        pos -= pos // M * M
        holder = np.full(len(free), n, np.int64)  # turn (0..n-1) holding each empty slot
        want = pos.argmin(1)
        moving = np.arange(n)
        while True:
            held = holder[want]
            np.minimum.at(holder, want, moving)
            now = holder[want]
            lost, displaced = now != moving, (now < held) & (held < n)
            if not (lost.any() or displaced.any()):
                break
            # a turn never takes a slot held by an earlier one: strike it from its row
            pos[moving[lost], want[lost]] = M
            pos[held[displaced], want[displaced]] = M
            moving = np.concatenate((moving[lost], held[displaced]))
            want = pos[moving].argmin(1)
        got = np.flatnonzero(holder < n)
        self.claim[free[got]] = holder[got] + t0
        b = rows[holder[got]]
        self.cur[b] = (free[got] + self.skip[b]) % M


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
