from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP

from rusty_rail.core.errors import ParseError
from rusty_rail.core.ipv4 import FragmentFlags, IPv4Header, build_ipv4, parse_ipv4

addresses = st.integers(0, 2**32 - 1).map(IPv4Address)
headers = st.builds(
    IPv4Header,
    src=addresses,
    dst=addresses,
    protocol=st.integers(0, 255),
    tos=st.integers(0, 255),
    identification=st.integers(0, 0xFFFF),
    flags=st.sampled_from([FragmentFlags(0), FragmentFlags.DF, FragmentFlags.MF]),
    fragment_offset=st.integers(0, 0x1FFF),
    ttl=st.integers(0, 255),
    options=st.integers(0, 10).map(lambda n: b"\x01" * (4 * n)),
)


@given(headers, st.binary(max_size=200))
def test_round_trip(header: IPv4Header, payload: bytes) -> None:
    raw = build_ipv4(header, payload)
    parsed, got_payload = parse_ipv4(raw)
    assert got_payload == payload
    assert (parsed.src, parsed.dst, parsed.protocol, parsed.tos, parsed.ttl) == (header.src, header.dst, header.protocol, header.tos, header.ttl)
    assert (parsed.flags, parsed.fragment_offset, parsed.options) == (header.flags, header.fragment_offset, header.options)
    assert build_ipv4(parsed, got_payload) == raw


@given(headers, st.binary(max_size=64))
def test_scapy_agrees(header: IPv4Header, payload: bytes) -> None:
    raw = build_ipv4(header, payload)
    pkt = IP(raw)
    assert pkt.src == str(header.src) and pkt.dst == str(header.dst)
    assert pkt.len == len(raw)
    assert IP(bytes(pkt.__class__(raw))).chksum == pkt.chksum  # scapy recomputes nothing when parsing
    del pkt.chksum
    assert bytes(pkt)[10:12] == raw[10:12]  # scapy's own checksum of the same header


@given(headers, st.binary(max_size=64), st.data())
def test_truncated_input_raises_parse_error(header: IPv4Header, payload: bytes, data) -> None:
    raw = build_ipv4(header, payload)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(ParseError):
        parse_ipv4(raw[:cut])


def test_trailing_bytes_are_not_payload() -> None:
    raw = build_ipv4(IPv4Header(IPv4Address("10.0.0.1"), IPv4Address("10.1.0.1"), 17), b"abcd")
    _, payload = parse_ipv4(raw + b"\x00" * 10)
    assert payload == b"abcd"


def test_bad_checksum_and_version_raise() -> None:
    raw = build_ipv4(IPv4Header(IPv4Address("10.0.0.1"), IPv4Address("10.1.0.1"), 17), b"")
    with pytest.raises(ParseError, match="checksum"):
        parse_ipv4(raw[:10] + b"\xff\xff" + raw[12:])
    with pytest.raises(ParseError, match="version"):
        parse_ipv4(b"\x65" + raw[1:])
    with pytest.raises(ParseError, match="header length"):
        parse_ipv4(b"\x44" + raw[1:])
