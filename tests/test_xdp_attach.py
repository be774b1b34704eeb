"""The XDP program attached natively to a veth inside throwaway namespaces: a GRE frame in, the
re-encapsulated frame back out of the same device (XDP_TX); clean detach; a leftover program replaced;
attach_pass / detach_all in a namespace given by name (what the lab uses instead of `ip link set xdp`).
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import GRE, Ether

from rusty_rail.bpf import libbpf
from rusty_rail.core.balancer import Balancer
from rusty_rail.engines.xdp import XdpProgram, attach_pass, counters, default_object_path, detach_all
from rusty_rail.engines.xdp.program import running_mode
from tests.engine_netns import VethPair, drain
from tests.services import catch_all
from tests.xdp_support import mirror

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


def _here() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_forward_through_native_xdp_on_veth(pair) -> None:
    reference = Balancer(pair.lb_ip, pair.lb_mac, [catch_all([BACKEND], 251)])
    reference.set_neighbour(BACKEND, pair.peer_mac)  # the backend's next hop is the peer
    with XdpProgram(table_size=251, conn_capacity=1024) as x:
        mirror(x, reference)
        with pair.inside(pair.lb_ns):
            x.attach(pair.lb_dev, mode="native")
        # XDP_TX on a veth is delivered only when the peer runs an XDP program too.
        assert attach_pass(pair.peer_dev, netns=pair.peer_ns) != 0
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
        assert counters.named(x)["forwarded"] == 3

        x.detach()
        assert _attached_id(pair, pair.lb_ns, pair.lb_ifindex) == 0


def test_leftover_program_is_replaced_and_detach_is_clean(pair) -> None:
    with XdpProgram(table_size=251, conn_capacity=64) as first, XdpProgram(table_size=251, conn_capacity=64) as second:
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


def test_a_program_in_the_other_mode_is_refused_never_detached(pair) -> None:
    """Native and generic cannot run at once, and only a program of the same mode can be replaced
    atomically: attach() refuses rather than leave the device without a program."""
    with XdpProgram(table_size=251, conn_capacity=64) as first, XdpProgram(table_size=251, conn_capacity=64) as second:
        with pair.inside(pair.lb_ns):
            first.attach(pair.lb_ifindex, mode="skb")
            running = libbpf.xdp_query_id(pair.lb_ifindex)
            assert running_mode(pair.lb_ifindex) == "skb"
            with pytest.raises(OSError) as refused:
                second.attach(pair.lb_ifindex, mode="native")
            assert refused.value.errno == errno.EEXIST and second.attached_ifindex is None
            assert libbpf.xdp_query_id(pair.lb_ifindex) == running  # untouched
            second.attach(pair.lb_ifindex, mode="skb")
            assert second.replaced_program_id == running
            first._attached = None  # its program is gone: its close must not detach the second's
            second.close()
            assert running_mode(pair.lb_ifindex) is None


def test_detach_from_the_namespace_it_attached_in(pair) -> None:
    """detach() after leaving the namespace acts on that namespace's interface, not on ours."""
    with XdpProgram(table_size=251, conn_capacity=64) as x:
        with pair.inside(pair.lb_ns):
            x.attach(pair.lb_dev, mode="skb")
            assert libbpf.xdp_query_id(pair.lb_ifindex, libbpf.XDP_FLAGS_SKB_MODE) != 0
        x.detach()
        assert _attached_id(pair, pair.lb_ns, pair.lb_ifindex) == 0


def test_attach_pass_and_detach_all_by_namespace_name(pair) -> None:
    here = _here()
    native = attach_pass(pair.peer_dev, netns=pair.peer_ns)
    assert _here() == here  # only the call ran there
    assert native != 0 and _attached_id(pair, pair.peer_ns, pair.peer_ifindex) == native
    generic = attach_pass(pair.peer_dev, mode="skb", netns=pair.peer_ns)  # replaces the native one
    assert generic not in (0, native)
    with pair.inside(pair.peer_ns):
        assert libbpf.xdp_query_id(pair.peer_ifindex, libbpf.XDP_FLAGS_SKB_MODE) == generic
    assert detach_all(pair.peer_dev, netns=pair.peer_ns) == generic
    assert _attached_id(pair, pair.peer_ns, pair.peer_ifindex) == 0
    assert detach_all(pair.peer_dev, netns=pair.peer_ns) == 0  # nothing there: nothing to do
    assert _here() == here


def test_attach_to_a_missing_interface_fails_cleanly() -> None:
    with XdpProgram(table_size=251, conn_capacity=64) as x:
        with pytest.raises(OSError):
            x.attach("rr-no-such-if0")
        assert x.attached_ifindex is None
        assert socket.if_nametoindex("lo")  # nothing on the host was touched
