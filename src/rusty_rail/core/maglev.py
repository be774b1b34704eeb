"""Maglev lookup tables: Eisenbud et al., NSDI 2016, section 3.4, Pseudocode 1.

Tables are built here only; data planes receive the finished slots. Every balancer that builds a table
from the same backend set gets the same table, because the backends are put in a canonical order
((version, address): IPv4 backends in address order, then IPv6 ones) and `offset` and `skip` come from
fixed, keyed BLAKE2b hashes of the address's bytes (4 or 16), never from Python's per-process hash().
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from rusty_rail.core.address import Address, AddressLike, as_address, canonical_key

DEFAULT_TABLE_SIZE = 65537
_OFFSET_KEY = b"rusty-rail/maglev/offset"
_SKIP_KEY = b"rusty-rail/maglev/skip"

BackendLike = AddressLike


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


def permutation_params(backend: Address, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's preference list, `(offset + j * skip) mod size`."""
    name = backend.packed
    return _h(_OFFSET_KEY, name) % size, _h(_SKIP_KEY, name) % (size - 1) + 1


@dataclass(frozen=True)
class MaglevTable:
    backends: tuple[Address, ...]
    """The backends in canonical order; `slots` index into this."""
    slots: Sequence[int]
    """One entry per table slot, an index into `backends`; empty when there are no backends."""
    weights: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.slots)

    def backend_for(self, flow_hash: int) -> Address | None:
        if not self.backends:
            return None
        return self.backends[self.slots[flow_hash % len(self.slots)]]

    def slot_counts(self) -> list[int]:
        counts = [0] * len(self.backends)
        for index in self.slots:
            counts[index] += 1
        return counts


def canonical_backends(backends: Iterable[BackendLike]) -> tuple[Address, ...]:
    """Each backend once, in (version, address) order: every balancer lists a set the same way."""
    unique = {as_address(b) for b in backends}
    return tuple(sorted(unique, key=canonical_key))


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
    given = [as_address(b) for b in backends]
    ordered = canonical_backends(given)
    if weights is None:
        weight_of = {b: 1 for b in ordered}
    elif isinstance(weights, Mapping):
        weight_of = {as_address(b): int(w) for b, w in weights.items()}
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
        return MaglevTable(ordered, [], turns)
    return MaglevTable(ordered, _populate(ordered, turns, size), turns)


def _populate(backends: Sequence[Address], turns: Sequence[int], size: int) -> list[int]:
    params = [permutation_params(b, size) for b in backends]
    # next_slot[i] is the next candidate of backend i's preference list, kept as a slot number so each
    # step is one addition, not a multiplication (offset + j * skip, advanced by skip).
    next_slot = [offset for offset, _ in params]
    skips = [skip for _, skip in params]
    entry = [-1] * size
    filled = 0
    active = [i for i, w in enumerate(turns) if w > 0]
    while True:
        for i in active:
            skip = skips[i]
            c = next_slot[i]
            for _ in range(turns[i]):
                while entry[c] >= 0:
                    c += skip
                    if c >= size:
                        c -= size
                entry[c] = i
                filled += 1
                if filled == size:
                    return entry
                c += skip
                if c >= size:
                    c -= size
            next_slot[i] = c
