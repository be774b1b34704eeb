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
  (M is prime); the last turns are taken one after another on that small (turns x empty slots)
  matrix, each from its row's nearest slots sorted by numpy.

The fill itself is in maglev_fill.py. Unit weights with many backends use rounds (`Rounds` in
maglev_rounds.py; a round's last few moving turns go one at a time in a plain loop). Pools of up to
0.8 sqrt(M) backends (204 at M = 65537) run those rounds in stages of 10 to 20: each backend's list
of the slots empty at the stage's start, turn (i, r) proposing to its r-th entry on, a turn that
loses pushing its backend's later turns one entry along. Weighted or small pools use `Chunks`
(maglev_chunks.py), which runs deferred acceptance over chunks of many turns at once: a backend's
turns go down one list in order, each taking the first slot after its predecessor's that no earlier
turn holds (a running count along each list, iterated to its fixed point).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

import numpy as np

from rusty_rail.core.constants import DEFAULT_TABLE_SIZE
from rusty_rail.core.maglev_fill import fill as _fill

_OFFSET_KEY = b"rusty-rail/maglev/offset"
_SKIP_KEY = b"rusty-rail/maglev/skip"

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

