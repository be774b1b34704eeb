from __future__ import annotations

import subprocess
import sys

import mmh3
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rusty_rail.core.flowhash import RR_HASH_SEED, flow_hash, flow_hashes, murmur3_32


@given(st.binary(max_size=64), st.integers(0, 2**32 - 1))
def test_murmur3_matches_mmh3(data: bytes, seed: int) -> None:
    assert murmur3_32(data, seed) == mmh3.hash(data, seed, signed=False)


@given(st.binary(min_size=16, max_size=16), st.integers(0, 2**32 - 1))
def test_flow_hash_matches_the_pure_python_twin(key: bytes, seed: int) -> None:
    assert flow_hash(key, seed) == murmur3_32(key, seed)


def test_reference_vectors() -> None:
    # Published MurmurHash3_x86_32 vectors.
    assert murmur3_32(b"", 0) == 0
    assert murmur3_32(b"", 1) == 0x514E28B7
    assert murmur3_32(b"hello", 0) == 0x248BFA47
    assert murmur3_32(b"The quick brown fox jumps over the lazy dog", 0x9747B28C) == 0x2FA826CD


def test_same_in_another_process_with_another_hash_seed() -> None:
    key = bytes(range(16))
    code = "from rusty_rail.core.flowhash import flow_hash; print(flow_hash(bytes(range(16))))"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": "12345"}, capture_output=True, text=True, check=True)
    assert int(out.stdout) == flow_hash(key, RR_HASH_SEED)


def test_flow_hashes_equals_mmh3_on_random_keys() -> None:
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 256, size=(5000, 16), dtype=np.uint8)
    keys[:10] = 0  # the all-zero key and the all-ones key too
    keys[10:20] = 0xFF
    for seed in (RR_HASH_SEED, 0, 0xFFFFFFFF):
        got = flow_hashes(keys, seed)
        assert got.dtype == np.uint32
        assert got.tolist() == [mmh3.hash(k.tobytes(), seed, signed=False) for k in keys]


def test_flow_hashes_takes_only_16_byte_keys() -> None:
    assert flow_hashes(np.zeros((0, 16), np.uint8)).shape == (0,)
    with pytest.raises(ValueError, match="16"):
        flow_hashes(np.zeros((3, 40), np.uint8))
