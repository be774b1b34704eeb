from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.l2 import GRE

from rusty_rail.core.errors import ParseError
from rusty_rail.core.gre import GreHeader, build_gre, parse_gre

gre_headers = st.builds(
    GreHeader,
    protocol=st.sampled_from([0x0800, 0x86DD, 0x6558]),
    checksum_present=st.booleans(),
    key=st.none() | st.integers(0, 2**32 - 1),
    sequence=st.none() | st.integers(0, 2**32 - 1),
)


@given(gre_headers, st.binary(max_size=300))
def test_round_trip_and_scapy_agrees(header: GreHeader, payload: bytes) -> None:
    raw = build_gre(header, payload)
    parsed, got = parse_gre(raw)
    assert got == payload
    assert (parsed.protocol, parsed.checksum_present, parsed.key, parsed.sequence) == (header.protocol, header.checksum_present, header.key, header.sequence)
    pkt = GRE(raw)
    assert pkt.proto == header.protocol
    assert bool(pkt.key_present) == (header.key is not None)
    if header.checksum_present:
        del pkt.chksum
        assert bytes(pkt)[4:6] == raw[4:6]  # scapy computes the same RFC 2784 checksum


@given(gre_headers, st.binary(max_size=8), st.data())
def test_truncated_header_raises(header: GreHeader, payload: bytes, data) -> None:
    raw = build_gre(header, payload)
    cut = data.draw(st.integers(0, header.length - 1))
    with pytest.raises(ParseError):
        parse_gre(raw[:cut])


@pytest.mark.parametrize(
    "first_word, message",
    [(b"\x00\x01", "version"), (b"\x40\x00", "reserved"), (b"\x08\x00", "reserved"), (b"\x04\x00", "reserved")],
)
def test_discarded_headers(first_word: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        parse_gre(first_word + b"\x08\x00" + b"\x00" * 20)


def test_bits_6_to_12_are_ignored() -> None:
    header, payload = parse_gre(b"\x00\xf8\x08\x00" + b"data")
    assert header.protocol == 0x0800 and payload == b"data"


def test_bad_checksum() -> None:
    raw = bytearray(build_gre(GreHeader(checksum_present=True), b"payload"))
    raw[-1] ^= 0xFF
    with pytest.raises(ParseError, match="checksum"):
        parse_gre(bytes(raw))
