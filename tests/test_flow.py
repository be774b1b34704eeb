from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from rusty_rail.core.flow import FlowKey, inner_flow_key
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
