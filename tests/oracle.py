"""Independent references the tests compare the project against.

Written from the specifications, not from the project's code: mmh3 (a C extension of Appleby's
MurmurHash3) for the flow hash, and the paper's Pseudocode 1 transcribed literally for Maglev.
"""

from __future__ import annotations

import hashlib
import struct
from ipaddress import IPv4Address

import mmh3

SEED = 0x52525F31


def oracle_key(src: str, dst: str, proto: int, sport: int = 0, dport: int = 0) -> bytes:
    return IPv4Address(src).packed + IPv4Address(dst).packed + struct.pack("!HHB3x", sport, dport, proto)


def oracle_hash(key: bytes) -> int:
    return mmh3.hash(key, SEED, signed=False)


def oracle_maglev(backends: list[str], size: int) -> list[str]:
    """Pseudocode 1 of the paper, literally: permutation[i][j] = (offset + j * skip) mod M."""
    names = sorted(IPv4Address(b) for b in backends)

    def h(key: bytes, name: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(name, key=key, digest_size=8).digest(), "big")

    offset = [h(b"rusty-rail/maglev/offset", b.packed) % size for b in names]
    skip = [h(b"rusty-rail/maglev/skip", b.packed) % (size - 1) + 1 for b in names]
    nxt = [0] * len(names)
    entry: list[int] = [-1] * size
    n = 0
    while True:
        for i in range(len(names)):
            c = (offset[i] + nxt[i] * skip[i]) % size
            while entry[c] >= 0:
                nxt[i] += 1
                c = (offset[i] + nxt[i] * skip[i]) % size
            entry[c] = i
            nxt[i] += 1
            n += 1
            if n == size:
                return [str(names[e]) for e in entry]
