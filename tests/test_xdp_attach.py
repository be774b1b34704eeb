"""The XDP program attached natively to a veth inside throwaway namespaces: a GRE frame in, the
re-encapsulated frame back out of the same device (XDP_TX); clean detach; a leftover program replaced.
"""

from __future__ import annotations

import os
import socket

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import GRE, Ether

from rusty_rail.bpf import libbpf
from rusty_rail.core.balancer import Balancer
from rusty_rail.engines.xdp import XdpBalancer, default_object_path
from tests.engine_netns import VethPair, drain

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not default_object_path().exists(), reason="run `make bpf` first"),
]

BACKEND = "10.2.0.1"
CLIENT, VIP = "10.0.0.1", "10.1.0.1"


@pytest.fixture
def pair():
    p = VethPair()
    try:
        yield p
    finally:
        p.close()


def _attached_id(pair: VethPair, ns: str, ifindex: int) -> int:
    with pair.inside(ns):
        return libbpf.xdp_query_id(ifindex)


def test_forward_through_native_xdp_on_veth(pair) -> None:
    reference = Balancer(pair.lb_ip, pair.lb_mac, [BACKEND], table_size=251)
    reference.set_neighbour(BACKEND, pair.peer_mac)  # the backend's next hop is the peer
    pass_fd = libbpf.prog_load(libbpf.BPF_PROG_TYPE_XDP, libbpf.XDP_PASS_INSNS)
    try:
        with XdpBalancer(table_size=251, conn_capacity=1024) as x:
            x.sync_from_balancer(reference)
            with pair.inside(pair.lb_ns):
                x.attach(pair.lb_dev, mode="native")
            # XDP_TX on a veth is delivered only when the peer runs an XDP program too.
            with pair.inside(pair.peer_ns):
                libbpf.xdp_attach(pair.peer_ifindex, pass_fd, libbpf.XDP_FLAGS_DRV_MODE)
            assert _attached_id(pair, pair.lb_ns, pair.lb_ifindex) != 0

            sock = pair.peer_packet_socket()
            try:
                frames = []
                for sport in (40000, 40001, 40002):
                    inner = IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags="S")
                    frame = bytes(Ether(src=pair.peer_mac, dst=pair.lb_mac)
                                  / IP(src=pair.peer_ip, dst=pair.lb_ip, proto=47) / GRE(proto=0x0800) / inner)
                    frames.append(frame)
                    sock.send(frame)
                expected = {reference.decide(f, now=0.0).frame for f in frames}
                got = drain(sock, lambda f: f[6:12] == pair.lb_mac and f[23] == 47, count=3)
            finally:
                sock.close()
            assert set(got) == expected
            assert x.counters()["forwarded"] == 3

            x.detach()
            assert _attached_id(pair, pair.lb_ns, pair.lb_ifindex) == 0
    finally:
        os.close(pass_fd)


def test_leftover_program_is_replaced_and_detach_is_clean(pair) -> None:
    with XdpBalancer(table_size=251, conn_capacity=64) as first, XdpBalancer(table_size=251, conn_capacity=64) as second:
        with pair.inside(pair.lb_ns):
            first.attach(pair.lb_ifindex)
            leftover = libbpf.xdp_query_id(pair.lb_ifindex)
            first._attached = None  # as if its process had died without detaching
            second.attach(pair.lb_ifindex)
            assert second.replaced_program_id == leftover
            now = libbpf.xdp_query_id(pair.lb_ifindex)
            assert now not in (0, leftover)
            second.close()  # closing detaches
            assert libbpf.xdp_query_id(pair.lb_ifindex) == 0


def test_attach_to_a_missing_interface_fails_cleanly() -> None:
    with XdpBalancer(table_size=251, conn_capacity=64) as x:
        with pytest.raises(OSError):
            x.attach("rr-no-such-if0")
        assert x.attached_ifindex is None
        assert socket.if_nametoindex("lo")  # nothing on the host was touched
