"""The flow hash every balancer shares: murmur3 x86_32 with a fixed seed (docs/WIRE.md section 6).

Never Python's hash(): it is randomised per process, and balancers behind ECMP must agree without
talking. The XDP program computes the same function; tests compare the two.

`flow_hash` runs once per new flow, so it uses mmh3 (a C extension of Appleby's code: 85 ns against
2 us for Python arithmetic). `murmur3_32` is the readable pure-Python twin, checked against the
published vectors and against `flow_hash`. `flow_hashes` is the same function over a whole array of
keys at once (numpy, for the AF_PACKET engine's blocks), checked against mmh3.
"""

from __future__ import annotations

import struct

import mmh3
import numpy as np

from rusty_rail.core.constants import RR_HASH_SEED

__all__ = ["RR_HASH_SEED", "flow_hash", "flow_hashes", "fmix32", "murmur3_32"]

_M32 = 0xFFFFFFFF
_C1 = 0xCC9E2D51
_C2 = 0x1B873593


def fmix32(h: int) -> int:
    """murmur3's finaliser: mixes every input bit into every output bit."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def murmur3_32(data: bytes, seed: int = RR_HASH_SEED) -> int:
    """MurmurHash3_x86_32 (Austin Appleby's reference), for any length."""
    h = seed & _M32
    n = len(data)
    full = n - n % 4
    for (k,) in struct.iter_unpack("<I", data[:full]):
        k = (k * _C1) & _M32
        k = ((k << 15) | (k >> 17)) & _M32
        k = (k * _C2) & _M32
        h ^= k
        h = ((h << 13) | (h >> 19)) & _M32
        h = (h * 5 + 0xE6546B64) & _M32
    tail = data[full:]
    if tail:
        k = int.from_bytes(tail, "little")
        k = (k * _C1) & _M32
        k = ((k << 15) | (k >> 17)) & _M32
        k = (k * _C2) & _M32
        h ^= k
    h ^= n
    return fmix32(h)


def flow_hash(key: bytes, seed: int = RR_HASH_SEED) -> int:
    """murmur3_32 of a flow key, 16 bytes (IPv4) or 40 (IPv6) (docs/WIRE.md section 6)."""
    return mmh3.hash(key, seed, signed=False)


def flow_hashes(keys: np.ndarray, seed: int = RR_HASH_SEED) -> np.ndarray:
    """flow_hash of every row of `keys`, an (N, 16) uint8 array of flow keys: an (N,) uint32 array.

    murmur3_32 over four little-endian blocks, as arrays: numpy's uint32 arithmetic wraps modulo 2**32,
    which is murmur3's own arithmetic, so every step is one whole-array operation."""
    if keys.ndim != 2 or keys.shape[1] != 16:
        raise ValueError(f"flow keys must be an (N, 16) array, not {keys.shape}")
    # The four blocks' k (multiply, rotate, multiply) for every key at once; then h over the blocks in
    # turn, in place: a block costs a few calls whatever N is (the per-call cost is what a block pays).
    k = np.ascontiguousarray(keys, dtype=np.uint8).view("<u4") * np.uint32(_C1)
    k = (k << np.uint32(15)) | (k >> np.uint32(17))
    k *= np.uint32(_C2)
    h = np.full(len(k), seed & _M32, dtype=np.uint32)
    spare = np.empty_like(h)
    for i in range(4):
        h ^= k[:, i]
        np.left_shift(h, np.uint32(13), out=spare)
        h >>= np.uint32(19)
        h |= spare
        h *= np.uint32(5)
        h += np.uint32(0xE6546B64)
    h ^= np.uint32(16)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h
