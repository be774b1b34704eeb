"""The values the C programs must repeat (they cannot import Python) agree with core/constants.py."""

from __future__ import annotations

import re

from rusty_rail.bpf.build import BPF_DIR
from rusty_rail.core import constants
from rusty_rail.core.flowhash import fmix32


def _define(header: str, name: str) -> int:
    """The value of `#define NAME value` in a header: a number, or (a << b)."""
    m = re.search(rf"^#define {name} \(?(\w+)(?: << (\w+)\))?", (BPF_DIR / header).read_text(), re.M)
    assert m is not None, f"{header} defines no {name}"
    value = int(m.group(1), 0)
    return value << int(m.group(2), 0) if m.group(2) else value


def test_the_hash_seed_is_one_value() -> None:
    assert _define("rr_hash.h", "RR_HASH_SEED") == constants.RR_HASH_SEED


def test_the_xdp_program_defaults_follow_the_constants() -> None:
    assert _define("rr_structs.h", "RR_DEFAULT_TABLE_SIZE") == constants.DEFAULT_TABLE_SIZE
    assert _define("rr_structs.h", "RR_DEFAULT_CONNS") == constants.DEFAULT_CONN_CAPACITY


def test_the_c_finaliser_is_murmur3s() -> None:
    """rr_hash.h's rr_fmix32 has the constants and shifts of core.flowhash.fmix32 (Appleby's)."""
    body = (BPF_DIR / "rr_hash.h").read_text()
    assert re.findall(r"h \^= h >> (\d+);", body) == ["16", "13", "16"]
    assert re.findall(r"h \*= (0x[0-9A-Fa-f]+);", body) == ["0x85EBCA6B", "0xC2B2AE35"]
    assert fmix32(1) == 0x514E28B7  # MurmurHash3's fmix32(1), a published value
