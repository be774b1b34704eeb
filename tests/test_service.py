from __future__ import annotations

from collections import Counter
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from rusty_rail.core.balancer import Balancer
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import ServiceKey, ServiceMatcher, ServiceProtocol
from rusty_rail.core.verdict import Action, DropReason
from tests.fixtures.golden import LB_ADDRESS, wrapped
from tests.services import catch_all, service

WEB = ServiceKey(IPv4Address("10.1.0.1"), ServiceProtocol.TCP, 80)
DNS = ServiceKey(IPv4Address("10.1.0.1"), ServiceProtocol.UDP, 53)
ALL = ServiceKey(IPv4Address("10.1.0.2"))


def balancer() -> Balancer:
    b = Balancer(LB_ADDRESS, b"\x02" * 6, [service(WEB, ["10.2.0.1", "10.2.0.2"]), service(DNS, ["10.2.0.3"]),
                                           service(ALL, ["10.2.0.4"])])
    for last in range(1, 5):
        b.set_neighbour(f"10.2.0.{last}", bytes([2, 0, 0, 0, 2, last]))
    return b


def backend_of(b: Balancer, inner) -> str | DropReason:
    verdict = b.decide(wrapped(inner), now=0)
    if verdict.action == Action.DROP:
        return verdict.reason
    return str(ip_address(verdict.backend))


def test_packets_go_to_their_service() -> None:
    b = balancer()
    assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / TCP(sport=1, dport=80)) in ("10.2.0.1", "10.2.0.2")
    assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / UDP(sport=1, dport=53)) == "10.2.0.3"
    assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.2") / TCP(sport=1, dport=22)) == "10.2.0.4"
    assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.2") / ICMP(type=13)) == "10.2.0.4"  # not an echo: forwarded


def test_unconfigured_vip_port_or_protocol_is_no_service() -> None:
    b = balancer()
    assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / TCP(sport=1, dport=443)) == DropReason.NO_SERVICE
    assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / UDP(sport=1, dport=80)) == DropReason.NO_SERVICE
    assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.9") / TCP(sport=1, dport=80)) == DropReason.NO_SERVICE
    assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / ICMP()) == DropReason.NO_SERVICE
    assert b.drops[DropReason.NO_SERVICE] == 4


def test_icmp_error_and_fragments_find_the_service() -> None:
    b = balancer()
    flow = backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / TCP(sport=999, dport=80))
    error = IP(src="10.9.9.9", dst="10.1.0.1") / ICMP(type=3, code=4) / IP(src="10.1.0.1", dst="10.0.0.1") / TCP(sport=80, dport=999)
    assert backend_of(b, error) == flow
    fragment = IP(src="10.0.0.1", dst="10.1.0.1", frag=8, proto=17) / Raw(b"z" * 8)
    assert backend_of(b, fragment) == "10.2.0.3"


def test_drained_backend_keeps_flows_and_gets_no_new_ones() -> None:
    b = balancer()
    flows = {sport: backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / TCP(sport=sport, dport=80)) for sport in range(200)}
    b.set_services([service(WEB, ["10.2.0.1", "10.2.0.2"], weights={"10.2.0.1": 0, "10.2.0.2": 1}),
                    service(DNS, ["10.2.0.3"]), service(ALL, ["10.2.0.4"])])
    for sport, backend in flows.items():
        assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / TCP(sport=sport, dport=80)) == backend
    fresh = {backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / TCP(sport=sport, dport=80)) for sport in range(1000, 1200)}
    assert fresh == {"10.2.0.2"}


def test_explain_knows_services_and_a_removed_service_matches_nothing() -> None:
    b = balancer()
    assert b.explain(FlowKey(IPv4Address("10.0.0.1"), IPv4Address("10.1.0.1"), 6, 1, 443), now=0) == (None, "no service matches")
    b.set_services([s.service for k, s in b.services.items() if k != DNS])
    assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / UDP(sport=1, dport=53)) == DropReason.NO_SERVICE


def test_catch_all_takes_what_no_named_service_matches() -> None:
    b = balancer()
    b.set_services([*(p.service for p in b.services.values()), catch_all(["10.2.0.9"])])
    b.set_neighbour("10.2.0.9", b"\x02" * 6)
    assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / TCP(sport=1, dport=443)) == "10.2.0.9"
    assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.7") / UDP(sport=1, dport=53)) == "10.2.0.9"
    assert backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / UDP(sport=1, dport=53)) == "10.2.0.3"
    assert b.drops[DropReason.NO_SERVICE] == 0


def test_unchanged_service_keeps_its_pool_and_figures() -> None:
    b = balancer()
    backend_of(b, IP(src="10.0.0.1", dst="10.1.0.1") / UDP(sport=1, dport=53))
    dns = b.services[DNS]
    b.set_services([p.service for p in b.services.values()])
    assert b.services[DNS] is dns and dns.packets[int(IPv4Address("10.2.0.3"))] == 1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.1.0.1:80", ServiceKey(IPv4Address("10.1.0.1"), ServiceProtocol.TCP, 80)),
        ("10.1.0.1:53/udp", ServiceKey(IPv4Address("10.1.0.1"), ServiceProtocol.UDP, 53)),
        ("10.1.0.1", ServiceKey(IPv4Address("10.1.0.1"))),
        ("*", ServiceKey.catch_all()),
        ("open", ServiceKey.catch_all()),
        ("[2001:db8::1]:443", ServiceKey(IPv6Address("2001:db8::1"), ServiceProtocol.TCP, 443)),
        ("[2001:db8::1]:53/udp", ServiceKey(IPv6Address("2001:db8::1"), ServiceProtocol.UDP, 53)),
        ("2001:db8::1", ServiceKey(IPv6Address("2001:db8::1"))),
        ("[2001:db8::1]", ServiceKey(IPv6Address("2001:db8::1"))),
    ],
)
def test_parse_service_key(text: str, expected: ServiceKey) -> None:
    assert ServiceKey.parse(text) == expected
    with pytest.raises(ValueError):
        ServiceKey(IPv4Address("10.1.0.1"), ServiceProtocol.ANY, 80)


def test_ipv6_service_keys_print_with_brackets_and_sort_after_ipv4() -> None:
    v6 = ServiceKey.parse("[2001:db8::1]:443")
    assert str(v6) == "[2001:db8::1]:443/tcp" and ServiceKey.parse(str(v6)) == v6
    assert sorted([v6, WEB, ServiceKey.catch_all()]) == [ServiceKey.catch_all(), WEB, v6]
    assert len(v6.entry()) == 20 and len(WEB.entry()) == 8


def test_a_vip_matches_flows_of_its_own_family_and_the_catch_all_both() -> None:
    v6 = ServiceKey(IPv6Address("2001:db8:1::1"), ServiceProtocol.TCP, 443)
    udp6 = ServiceKey(IPv6Address("2001:db8:1::1"), ServiceProtocol.UDP, 0)
    matcher = ServiceMatcher({WEB: "web", v6: "web6", udp6: "udp6", ServiceKey.catch_all(): "all"})
    assert (matcher.named4, matcher.named6) == (1, 2)
    c6, vip6 = IPv6Address("2001:db8:c::1"), IPv6Address("2001:db8:1::1")
    assert matcher.match(FlowKey(c6, vip6, 6, 40000, 443).packed) == "web6"
    assert matcher.match(FlowKey(c6, vip6, 17, 40000, 9).packed) == "udp6"
    assert matcher.match(FlowKey(c6, vip6, 6, 40000, 80).packed) == "all"
    assert matcher.match(FlowKey(c6, vip6, 6).packed) == "web6"  # a fragment: the lowest port (rule 4)
    assert matcher.match(FlowKey(c6, IPv6Address("2001:db8:1::2"), 6, 1, 443).packed) == "all"
    v4_key = FlowKey(IPv4Address("10.0.0.1"), IPv4Address("10.1.0.1"), 6, 1, 80).packed
    assert matcher.match(v4_key) == "web"
    only6 = ServiceMatcher({v6: "web6"})
    assert only6.match(v4_key) is None and only6.match(FlowKey(c6, vip6, 6, 1, 443).packed) == "web6"


def test_balancer_serves_ipv6_vips() -> None:
    v6 = ServiceKey(IPv6Address("2001:db8:1::1"), ServiceProtocol.TCP, 443)
    b = Balancer(LB_ADDRESS, b"\x02" * 6, [service(v6, ["10.2.0.1", "2001:db8:2::1"])], local_address6="2001:db8::11")
    b.set_neighbour("10.2.0.1", b"\x02" * 6)
    b.set_neighbour("2001:db8:2::1", b"\x02" * 6)
    got = {backend_of(b, IPv6(src="2001:db8:c::1", dst="2001:db8:1::1") / TCP(sport=p, dport=443)) for p in range(64)}
    assert got == {"10.2.0.1", "2001:db8:2::1"}
    assert backend_of(b, IPv6(src="2001:db8:c::1", dst="2001:db8:1::1") / TCP(sport=1, dport=80)) == DropReason.NO_SERVICE


_VIPS = [IPv4Address("10.1.0.1").packed, IPv4Address("10.1.0.2").packed, IPv4Address("10.1.0.3").packed]
_VIPS6 = [IPv6Address("2001:db8:1::1").packed, IPv6Address("2001:db8:1::2").packed]


def _flow_keys_of(src_len: int, vips: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda src, vip, sport, dport, proto: src + vip + sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes([proto, 0, 0, 0]),
        st.binary(min_size=src_len, max_size=src_len), st.sampled_from(vips), st.sampled_from([0, 1, 999, 65535]),
        st.sampled_from([0, 53, 80, 443]), st.sampled_from([1, 6, 17, 47]))


_flow_keys = _flow_keys_of(4, _VIPS) | _flow_keys_of(16, _VIPS6)  # both families' keys (16 and 40 bytes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_flow_keys, st.sampled_from([1, 2, 3])), max_size=60), st.booleans())
def test_tally_counts_each_entry_under_the_service_match_gives_it(entries, with_catch_all: bool) -> None:
    keys = [WEB, DNS, ALL, ServiceKey(IPv4Address("10.1.0.3"), ServiceProtocol.TCP, 0),
            ServiceKey(IPv4Address("10.1.0.3"), ServiceProtocol.TCP, 8080),
            ServiceKey(IPv6Address("2001:db8:1::1"), ServiceProtocol.TCP, 443),
            ServiceKey(IPv6Address("2001:db8:1::1"), ServiceProtocol.UDP, 0)]
    if with_catch_all:
        keys.append(ServiceKey.catch_all())
    matcher = ServiceMatcher({k: k for k in keys})
    one_by_one = Counter((matcher.match(k), b) for k, b in entries if matcher.match(k) is not None)
    assert matcher.tally(entries) == dict(one_by_one)
    only6 = ServiceMatcher({k: k for k in keys if k.vip is None or k.vip.version == 6})  # IPv4 keys: no lookup
    assert only6.tally(entries) == dict(Counter((only6.match(k), b) for k, b in entries if only6.match(k) is not None))
    only_catch_all = ServiceMatcher({ServiceKey.catch_all(): "all"})
    assert only_catch_all.tally(entries) == dict(Counter(("all", b) for _, b in entries))
    assert ServiceMatcher({}).tally(entries) == {}
