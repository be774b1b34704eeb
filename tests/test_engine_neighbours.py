"""Next-hop resolution from the kernel's tables, in a namespace pair of our own."""

from __future__ import annotations

import ipaddress

import pytest

from tests.engine_netns import VethPair, wait_for

pytestmark = pytest.mark.netns


def as_int(ip: str) -> int:
    return int(ipaddress.ip_address(ip))


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes | None]] = []

    def set_neighbour(self, backend: int, mac: bytes | None, mtu: int | None = None) -> None:
        self.calls.append((backend, mac))


def test_resolves_a_peer_never_contacted_directly_and_through_a_gateway(veth: VethPair) -> None:
    from rusty_rail.engines.neighbours import NeighbourResolver

    v = veth
    v.ip(v.lb_ns, "route", "add", "10.9.0.0/24", "via", v.peer_ip)
    assert v.peer_ip not in v.ip(v.lb_ns, "neigh", "show", "dev", v.lb_dev)
    with v.inside(v.lb_ns):
        resolver = NeighbourResolver(v.lb_dev)
    try:
        # 10.9.0.5 is behind the gateway (the peer); the first answer may be None while the kernel probes.
        assert wait_for(lambda: resolver.resolve(as_int("10.9.0.5"))) == v.peer_mac
        assert resolver.resolve(as_int(v.peer_ip)) == v.peer_mac
        # No route out of our device: unresolvable, and said so.
        assert resolver.resolve(as_int("192.0.2.1")) is None
        assert as_int("192.0.2.1") in resolver.unroutable

        sink = Sink()
        assert resolver.refresh([as_int(v.peer_ip)], sink) == 1
        assert sink.calls == [(as_int(v.peer_ip), v.peer_mac)]
        assert resolver.refresh([as_int(v.peer_ip)], sink) == 0, "unchanged answers are not repeated"
    finally:
        resolver.close()


def test_unanswered_neighbour_stays_unknown(veth: VethPair) -> None:
    from rusty_rail.engines.neighbours import NUD_FAILED, NUD_INCOMPLETE, NeighbourResolver

    v = veth
    with v.inside(v.lb_ns):
        resolver = NeighbourResolver(v.lb_dev)
    try:
        absent = as_int("10.77.0.99")
        assert resolver.resolve(absent) is None
        # The kernel took up the request: an entry exists and is being (or failed being) resolved.
        state = wait_for(lambda: resolver._lookup(ipaddress.ip_address(absent))[1])
        assert state & (NUD_INCOMPLETE | NUD_FAILED)
        assert resolver.resolve(absent) is None
    finally:
        resolver.close()


def test_resolves_ipv6_backends_by_neighbour_discovery_directly_and_through_a_gateway(veth: VethPair) -> None:
    from rusty_rail.engines.neighbours import NeighbourResolver

    v = veth
    v.add_ipv6()
    v.ip(v.lb_ns, "-6", "route", "add", "2001:db8:9::/64", "via", v.peer_ip6)
    with v.inside(v.lb_ns):
        resolver = NeighbourResolver(v.lb_dev)
    try:
        assert resolver.address6 == ipaddress.IPv6Address(v.lb_ip6)
        assert wait_for(lambda: resolver.resolve(as_int(v.peer_ip6))) == v.peer_mac
        assert wait_for(lambda: resolver.resolve(as_int("2001:db8:9::5"))) == v.peer_mac
        assert resolver.resolve(as_int("2001:db8:ffff::1")) is None  # no route out of our device
        assert as_int("2001:db8:ffff::1") in resolver.unroutable
    finally:
        resolver.close()


def test_device_info(veth: VethPair) -> None:
    from rusty_rail.engines.neighbours import DeviceError, DeviceInfo, device_info

    v = veth
    with v.inside(v.lb_ns):
        assert device_info(v.lb_dev) == DeviceInfo(v.lb_ifindex, v.lb_mac, ipaddress.IPv4Address(v.lb_ip), None, 1500)
        with pytest.raises(DeviceError, match="does not exist"):
            device_info("nosuchdev")
        with pytest.raises(DeviceError, match="no IPv4 and no global IPv6 address"):
            device_info(_no_ipv4(v))
        with pytest.raises(DeviceError, match="'lb0' has no global IPv6 address, and backend 2001:db8::1 is IPv6"):
            device_info(v.lb_dev).check_backends([as_int("10.2.0.1"), as_int("2001:db8::1")], v.lb_dev)
        v.add_ipv6()
        info = device_info(v.lb_dev)
        assert info.address6 == ipaddress.IPv6Address(v.lb_ip6)  # global, not the link-local one
        info.check_backends([as_int("10.2.0.1"), as_int("2001:db8::1")], v.lb_dev)


def _no_ipv4(v: VethPair) -> str:
    v.ip(v.lb_ns, "link", "add", "bare0", "type", "veth", "peer", "bare1")  # no dummy module here
    return "bare0"
