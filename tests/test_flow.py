from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Raw

from rusty_rail.core.flow import FlowKey, inner6_flow_key, inner_flow_key
from rusty_rail.core.verdict import DropReason
from tests.oracle import oracle_key


def key_of(pkt) -> bytes | None:
    raw = bytes(pkt)
    return inner_flow_key(raw, (raw[0] & 0x0F) * 4)


def test_tcp_and_udp_five_tuple() -> None:
    assert key_of(IP(src="10.0.0.1", dst="10.1.0.1") / TCP(sport=1234, dport=80)) == oracle_key("10.0.0.1", "10.1.0.1", 6, 1234, 80)
    assert key_of(IP(src="10.0.0.1", dst="10.1.0.1") / UDP(sport=53, dport=5353)) == oracle_key("10.0.0.1", "10.1.0.1", 17, 53, 5353)


def test_fragments_use_three_tuple() -> None:
    first = IP(src="10.0.0.1", dst="10.1.0.1", flags="MF") / UDP(sport=1, dport=2)
    later = IP(src="10.0.0.1", dst="10.1.0.1", frag=10, proto=17) / Raw(b"x" * 8)
    assert key_of(first) == key_of(later) == oracle_key("10.0.0.1", "10.1.0.1", 17)


def test_icmp_error_follows_the_flow_it_is_about() -> None:
    flow = key_of(IP(src="10.0.0.1", dst="10.1.0.1") / TCP(sport=40000, dport=443))
    error = IP(src="172.16.5.5", dst="10.1.0.1") / ICMP(type=3, code=4) / IP(src="10.1.0.1", dst="10.0.0.1") / TCP(sport=443, dport=40000)
    assert key_of(error) == flow
    exceeded = IP(src="172.16.5.5", dst="10.1.0.1") / ICMP(type=11) / IP(src="10.1.0.1", dst="10.0.0.1") / UDP(sport=53, dport=9)
    assert key_of(exceeded) == oracle_key("10.0.0.1", "10.1.0.1", 17, 9, 53)


def test_icmp_echo_and_truncated_error_use_own_three_tuple() -> None:
    assert key_of(IP(src="10.0.0.1", dst="10.1.0.1") / ICMP(type=8)) == oracle_key("10.0.0.1", "10.1.0.1", 1)
    cut = IP(src="172.16.5.5", dst="10.1.0.1") / ICMP(type=3) / Raw(b"\x45" + b"\x00" * 10)
    assert key_of(cut) == oracle_key("172.16.5.5", "10.1.0.1", 1)


def test_tcp_without_ports_has_no_key() -> None:
    assert key_of(IP(src="10.0.0.1", dst="10.1.0.1", proto=6)) is None


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 65535), st.integers(0, 65535))
def test_packed_round_trip(src: int, dst: int, proto: int, sport: int, dport: int) -> None:
    key = FlowKey(IPv4Address(src), IPv4Address(dst), proto, sport, dport)
    assert FlowKey.from_packed(key.packed) == key
    assert len(key.packed) == 16


# -- IPv6 (docs/WIRE.md 4b, 5) -------------------------------------------------------------------------

C6, V6 = "2001:db8:c::1", "2001:db8:1::1"


def key6_of(pkt) -> bytes | DropReason:
    return inner6_flow_key(bytes(pkt))


def test_ipv6_tcp_and_udp_five_tuple() -> None:
    assert key6_of(IPv6(src=C6, dst=V6) / TCP(sport=1234, dport=443)) == oracle_key(C6, V6, 6, 1234, 443)
    assert key6_of(IPv6(src=C6, dst=V6) / UDP(sport=53, dport=5353)) == oracle_key(C6, V6, 17, 53, 5353)


def test_ipv6_extension_headers_are_walked_up_to_four() -> None:
    four = IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment(m=0, offset=0)
    assert key6_of(IPv6(src=C6, dst=V6) / four / TCP(sport=1, dport=2)) == oracle_key(C6, V6, 6, 1, 2)
    assert key6_of(IPv6(src=C6, dst=V6) / four / IPv6ExtHdrDestOpt() / TCP()) == DropReason.INNER_EXT_HEADERS
    cut = bytes(IPv6(src=C6, dst=V6) / IPv6ExtHdrDestOpt(len=1) / TCP())
    assert inner6_flow_key(cut[:40 + 15]) == DropReason.INNER_EXT_HEADERS
    assert inner6_flow_key(bytes(IPv6(src=C6, dst=V6, nh=0))) == DropReason.INNER_EXT_HEADERS


def test_ipv6_fragments_use_three_tuple_of_the_fragment_header() -> None:
    first = IPv6(src=C6, dst=V6) / IPv6ExtHdrFragment(m=1, id=7) / UDP(sport=1, dport=2)
    later = IPv6(src=C6, dst=V6) / IPv6ExtHdrFragment(nh=17, offset=9, id=7) / Raw(b"x" * 8)
    assert key6_of(first) == key6_of(later) == oracle_key(C6, V6, 17)


def test_icmpv6_errors_follow_the_flow_they_quote() -> None:
    flow = key6_of(IPv6(src=C6, dst=V6) / TCP(sport=40000, dport=443))
    for error in (ICMPv6DestUnreach(), ICMPv6PacketTooBig(mtu=1280), ICMPv6TimeExceeded(), ICMPv6ParamProblem()):
        quoted = IPv6(src="2001:db8:9::9", dst=V6) / error / IPv6(src=V6, dst=C6) / TCP(sport=443, dport=40000)
        assert key6_of(quoted) == flow
    no_ports = IPv6(src="2001:db8:9::9", dst=V6) / ICMPv6TimeExceeded() / IPv6(src=V6, dst=C6, nh=17)
    assert key6_of(no_ports) == oracle_key(C6, V6, 17)
    short = IPv6(src="2001:db8:9::9", dst=V6) / ICMPv6PacketTooBig() / Raw(bytes(IPv6(src=V6, dst=C6))[:39])
    assert key6_of(short) == oracle_key("2001:db8:9::9", V6, 58)
    echo = IPv6(src=C6, dst=V6) / ICMPv6EchoRequest(id=1)
    assert key6_of(echo) == oracle_key(C6, V6, 58)


def test_ipv6_tcp_without_ports_is_truncated() -> None:
    assert inner6_flow_key(bytes(IPv6(src=C6, dst=V6, nh=6))) == DropReason.INNER_TRUNCATED


@given(st.integers(0, 2**128 - 1), st.integers(0, 2**128 - 1), st.integers(0, 255), st.integers(0, 65535), st.integers(0, 65535))
def test_packed_round_trip_ipv6(src: int, dst: int, proto: int, sport: int, dport: int) -> None:
    key = FlowKey(IPv6Address(src), IPv6Address(dst), proto, sport, dport)
    assert FlowKey.from_packed(key.packed) == key
    assert len(key.packed) == 40


def test_a_flow_key_does_not_mix_families() -> None:
    with pytest.raises(ValueError):
        FlowKey(IPv4Address("10.0.0.1"), IPv6Address(V6), 6)
    assert str(FlowKey(IPv6Address(C6), IPv6Address(V6), 6, 1, 443)) == f"[{C6}]:1 -> [{V6}]:443 proto 6"
