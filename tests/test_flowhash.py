from __future__ import annotations

import subprocess
import sys

import mmh3
from hypothesis import given
from hypothesis import strategies as st

from rusty_rail.core.flowhash import RR_HASH_SEED, flow_hash, murmur3_32


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
