"""Independent references the tests compare the project against.

Written from the specifications, not from the project's code: mmh3 (a C extension of Appleby's
MurmurHash3) for the flow hash, the paper's Pseudocode 1 transcribed literally for Maglev, and
docs/WIRE.md's key layouts (section 6) and canonical order (section 10: version, then address).
"""

from __future__ import annotations

import hashlib
import struct
from ipaddress import ip_address

import mmh3

SEED = 0x52525F31


def oracle_key(src: str, dst: str, proto: int, sport: int = 0, dport: int = 0) -> bytes:
    """16 bytes for IPv4 addresses, 40 for IPv6 ones: src | dst | sport | dport | proto | 0 0 0."""
    a, b = ip_address(src), ip_address(dst)
    assert a.version == b.version
    return a.packed + b.packed + struct.pack("!HHB3x", sport, dport, proto)


def oracle_flow_label(key: bytes) -> int:
    """docs/WIRE.md section 8: the outer IPv6 flow label, the flow hash's low 20 bits."""
    return oracle_hash(key) & 0xFFFFF


def oracle_hash(key: bytes) -> int:
    return mmh3.hash(key, SEED, signed=False)


def oracle_maglev(backends: list[str], size: int) -> list[str]:
    """Pseudocode 1 of the paper, literally: permutation[i][j] = (offset + j * skip) mod M."""
    names = sorted((ip_address(b) for b in backends), key=lambda a: (a.version, int(a)))

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
