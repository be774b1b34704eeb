"""core/ipv6.py: the IPv6 codec (RFC 8200), checked against scapy's encoding and on truncated input."""

from __future__ import annotations

from ipaddress import IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.packet import Raw

from rusty_rail.core.errors import ParseError
from rusty_rail.core.ipv6 import (
    FragmentHeader,
    IPv6Header,
    NextHeader,
    OptionsHeader,
    build_extension_header,
    build_ipv6,
    parse_extension_headers,
    parse_ipv6,
)

SRC, DST = "2001:db8::1", "2001:db8:1::1"


def test_parse_matches_scapy() -> None:
    raw = bytes(IPv6(src=SRC, dst=DST, tc=0xB8, fl=0xABCDE, hlim=7) / TCP(sport=1, dport=2) / Raw(b"xyz"))
    header, payload = parse_ipv6(raw + b"pad")
    assert header == IPv6Header(IPv6Address(SRC), IPv6Address(DST), 6, 0xB8, 0xABCDE, 7, 23)
    assert payload == raw[40:]  # the trailing bytes are not the packet's


@given(st.integers(0, 2**128 - 1), st.integers(0, 2**128 - 1), st.integers(0, 255), st.integers(0, 255),
       st.integers(0, 0xFFFFF), st.integers(0, 255), st.binary(max_size=64))
def test_round_trip(src: int, dst: int, nh: int, tc: int, label: int, hlim: int, payload: bytes) -> None:
    header = IPv6Header(IPv6Address(src), IPv6Address(dst), nh, tc, label, hlim, len(payload))
    raw = build_ipv6(header, payload)
    assert parse_ipv6(raw) == (header, payload)
    assert raw == bytes(IPv6(src=str(header.src), dst=str(header.dst), nh=nh, tc=tc, fl=label, hlim=hlim) / Raw(payload))


@pytest.mark.parametrize("cut", [0, 1, 39])
def test_truncated_fixed_header(cut: int) -> None:
    with pytest.raises(ParseError):
        parse_ipv6(bytes(IPv6(src=SRC, dst=DST))[:cut])


def test_wrong_version_and_payload_length_beyond_the_bytes() -> None:
    raw = bytes(IPv6(src=SRC, dst=DST) / Raw(b"12345678"))
    with pytest.raises(ParseError, match="version 4"):
        parse_ipv6(b"\x40" + raw[1:])
    with pytest.raises(ParseError, match="payload length"):
        parse_ipv6(raw[:-1])


def test_extension_headers_walk_to_the_transport_header() -> None:
    packet = (IPv6(src=SRC, dst=DST) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt()
              / IPv6ExtHdrFragment(offset=0, m=0, id=5) / TCP(sport=1, dport=2))
    header, payload = parse_ipv6(bytes(packet))
    headers, last, at = parse_extension_headers(header.next_header, payload)
    assert [type(h).__name__ for h in headers] == ["OptionsHeader", "OptionsHeader", "OptionsHeader", "FragmentHeader"]
    assert last == NextHeader.TCP and payload[at:at + 4] == b"\x00\x01\x00\x02"
    assert b"".join(build_extension_header(h) for h in headers) == payload[:at]


def test_a_fragment_stops_the_walk_and_an_atomic_one_does_not() -> None:
    later = bytes(IPv6ExtHdrFragment(nh=17, offset=100, m=1, id=9) / Raw(b"data"))
    headers, last, at = parse_extension_headers(NextHeader.FRAGMENT, later)
    assert headers == [FragmentHeader(17, 100, True, 9)] and last == 17 and at == 8
    atomic = bytes(IPv6ExtHdrFragment(nh=6, offset=0, m=0) / TCP())
    assert parse_extension_headers(NextHeader.FRAGMENT, atomic)[1:] == (6, 8)


def test_more_than_four_headers_or_one_cut_short_is_a_parse_error() -> None:
    five = bytes(IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                 / IPv6ExtHdrDestOpt() / TCP())
    with pytest.raises(ParseError, match="more than 4"):
        parse_extension_headers(NextHeader.DESTINATION_OPTIONS, five)
    assert parse_extension_headers(NextHeader.DESTINATION_OPTIONS, five, limit=5)[1] == NextHeader.TCP
    one = bytes(IPv6ExtHdrHopByHop(options=[]) / TCP())
    for cut in (1, 7):
        with pytest.raises(ParseError, match="cut short"):
            parse_extension_headers(NextHeader.HOP_BY_HOP, one[:cut])
    with pytest.raises(ParseError, match="cut short"):
        parse_extension_headers(NextHeader.FRAGMENT, bytes(IPv6ExtHdrFragment())[:7])


@given(st.sampled_from([0, 43, 60]), st.integers(0, 255).filter(lambda n: n not in (0, 43, 44, 60)), st.integers(0, 3))
def test_options_header_round_trip(kind: int, nh: int, units: int) -> None:
    header = OptionsHeader(kind, nh, bytes(range(6 + 8 * units)))
    raw = build_extension_header(header)
    assert len(raw) == 8 * (units + 1)
    assert parse_extension_headers(kind, raw + b"\x00" * 4, limit=1) == ([header], nh, len(raw))


def test_build_refuses_what_cannot_be_encoded() -> None:
    with pytest.raises(ParseError):
        build_ipv6(IPv6Header(IPv6Address(SRC), IPv6Address(DST), 6, flow_label=1 << 20), b"")
    with pytest.raises(ParseError):
        build_extension_header(OptionsHeader(0, 6, b"\x00" * 7))
    with pytest.raises(ParseError):
        build_extension_header(FragmentHeader(6, offset=1 << 13))
