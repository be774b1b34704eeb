"""The AF_PACKET engine in a namespace of its own, fed from a peer namespace over veth.

The engine runs in a forked child that joined the lb namespace (tests/afpacket_netns.py); the test talks
to it as the control plane does (apply, counters, explain) and otherwise only through the wire, as a
router and a backend would.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from ipaddress import IPv4Address, ip_address

import pytest

from rusty_rail.core.balancer import Balancer
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import ServiceKey
from rusty_rail.dataplane import Counters, DataplaneState, EngineError, EngineOptions, StateBuilder
from rusty_rail.engines.afpacket import hostfilter
from rusty_rail.engines.afpacket.walker import BlockProcessor, per_frame
from tests.afpacket_netns import EngineProcess
from tests.engine_netns import (
    VethPair,
    drain,
    gre_frame,
    ipv4,
    is_icmp_protocol_unreachable,
    pending,
    ping,
    tcp6,
    udp,
    wait_for,
)

pytestmark = pytest.mark.netns


def mark_and_swap(balancer: Balancer) -> BlockProcessor:
    """Stand-in processing: GRE whose inner UDP payload ends in DROP or PASS is not sent; everything
    else goes back to its sender with MACs swapped and 3 bytes appended (so the test knows the engine
    sent *this*)."""
    def process(frames: list[bytes], now: float) -> list[bytes]:
        return [swapped(f) for f in frames if not f.endswith((b"DROP", b"PASS"))]
    return per_frame(process)


def swapped(frame: bytes) -> bytes:
    return frame[6:12] + frame[0:6] + frame[12:] + b"OUT"


def from_lb(v: VethPair) -> Callable[[bytes], bool]:
    return lambda f: f[6:12] == v.lb_mac and f[12:14] == b"\x08\x00" and f[23] == 47


def test_forwards_exactly_what_the_processor_returns_and_host_traffic_still_works(veth: VethPair) -> None:
    v = veth
    cap = v.peer_packet_socket()
    # Control: without the engine, the lb host answers GRE with ICMP protocol unreachable.
    probe = gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, ipv4("10.0.0.1", "10.1.0.1", 17, udp(1, 2, b"x")))
    cap.send(probe)
    drain(cap, is_icmp_protocol_unreachable, 1)

    with EngineProcess(v, processor=mark_and_swap) as engine:
        frames = []
        for i, size in enumerate([0, 1, 10, 100, 1000, 1400]):
            inner = ipv4(f"10.0.0.{i + 1}", "10.1.0.1", 17, udp(1000 + i, 80, bytes(size)))
            frames.append(gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, inner))
        for tail in (b"DROP", b"PASS"):
            frames.append(gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip,
                                    ipv4("10.0.0.9", "10.1.0.1", 17, udp(9, 9, tail))))
        for f in frames:
            cap.send(f)
        want = [swapped(f) for f in frames[:-2]]
        assert drain(cap, from_lb(v), len(want)) == want

        # The host still answers ping and TCP on the same device while the engine runs.
        ping(v, v.peer_ns, v.lb_ip)
        with v.inside(v.lb_ns):
            listener = socket.create_server((v.lb_ip, 8080))
        with v.inside(v.peer_ns):
            client = socket.create_connection((v.lb_ip, 8080), timeout=5)
        server, _ = listener.accept()
        client.sendall(b"hello")
        assert server.recv(5) == b"hello"
        for s in (client, server, listener):
            s.close()

        # The ping's reply came after any ICMP error for the GRE frames sent before it (same queue):
        # none came, nothing else was forwarded, and the nft rule counted every GRE frame.
        assert pending(cap, lambda f: is_icmp_protocol_unreachable(f) or from_lb(v)(f)) == []
        with v.inside(v.lb_ns):
            assert hostfilter.dropped(v.lb_dev) == len(frames)
        assert engine.counters().ready
        report = engine.stop()
    assert engine.table() is None, "the nft table must go with the engine"
    figures = report.counters.engine
    assert not report.handed_over and not report.counters.ready
    assert figures["rx_packets"] == len(frames), "the socket filter keeps ARP, ICMP and TCP out of the ring"
    assert figures["tx_ring"] == len(want)
    assert figures["tx_failed"] == 0 and figures["workers"] == 1


def is_icmpv6_parameter_problem(frame: bytes) -> bool:
    return len(frame) >= 55 and frame[12:14] == b"\x86\xdd" and frame[20] == 58 and frame[54] == 4


def test_gre_over_ipv6_reaches_the_ring_not_the_host_and_ipv6_to_the_host_still_works(veth: VethPair) -> None:
    v = veth
    v.add_ipv6()
    cap = v.peer_packet_socket()
    inner = tcp6("2001:db8:c::1", "2001:db8:1::1", 40000, 443, b"x")
    # Control: without the engine, the lb host answers GRE over IPv6 with ICMPv6 parameter problem (it
    # has no ip6_gre module: next header 47 is unrecognised, RFC 8200 4).
    cap.send(gre_frame(v.lb_mac, v.peer_mac, v.peer_ip6, v.lb_ip6, inner))
    drain(cap, is_icmpv6_parameter_problem, 1)
    with EngineProcess(v, processor=mark_and_swap) as engine:
        frames = [gre_frame(v.lb_mac, v.peer_mac, v.peer_ip6, v.lb_ip6, inner + bytes([i])) for i in range(5)]
        frames.append(gre_frame(v.lb_mac, v.peer_mac, v.peer_ip6, v.lb_ip6, ipv4("10.0.0.1", "10.1.0.1", 17, udp(1, 2, b"v4"))))
        for f in frames:
            cap.send(f)
        want = [swapped(f) for f in frames]
        assert drain(cap, lambda f: f[6:12] == v.lb_mac and f.endswith(b"OUT"), len(want)) == want
        ping(v, v.peer_ns, v.lb_ip6)  # neighbour discovery and ping6 reach the host
        with v.inside(v.lb_ns):
            listener = socket.create_server((v.lb_ip6, 8080), family=socket.AF_INET6)
        with v.inside(v.peer_ns):
            client = socket.create_connection((v.lb_ip6, 8080), timeout=5)
        server, _ = listener.accept()
        client.sendall(b"hello6")
        assert server.recv(6) == b"hello6"
        for s in (client, server, listener):
            s.close()
        assert pending(cap, is_icmpv6_parameter_problem) == []
        with v.inside(v.lb_ns):
            assert hostfilter.dropped(v.lb_dev) == len(frames)
        report = engine.stop()
    assert report.counters.engine["rx_packets"] == len(frames), "the socket filter keeps ND, ping6 and TCP out"


def test_replaces_a_leftover_table_and_removes_it_on_stop(veth: VethPair) -> None:
    v = veth
    table = hostfilter.table_name(v.lb_dev)
    script = f'table netdev {table} {{ chain stale {{ type filter hook ingress device "{v.lb_dev}" priority 0; }}; }}'
    subprocess.run(["ip", "netns", "exec", v.lb_ns, "nft", "-f", "-"], input=script, text=True, check=True)
    with EngineProcess(v, processor=mark_and_swap) as engine:
        listing = engine.table() or ""
        assert hostfilter.CHAIN in listing and "stale" not in listing
        engine.stop()
    assert engine.table() is None


def mark_worker(balancer: Balancer) -> BlockProcessor:
    """Stand-in processing for a worker: appends the pid of the worker that handled the frame (the
    factory runs in the worker, after the fork)."""
    pid = os.getpid().to_bytes(4, "big")

    def process(frames: list[bytes], now: float) -> list[bytes]:
        return [f[6:12] + f[0:6] + f[12:] + pid for f in frames]
    return per_frame(process)


def test_fanout_keeps_each_flow_on_one_worker_and_spreads_flows(veth: VethPair) -> None:
    v = veth
    cap = v.peer_packet_socket()
    v.add_ipv6()
    with EngineProcess(v, workers=2, processor=mark_worker) as engine:
        flows = [(f"10.0.{i // 200}.{i % 200 + 1}", "10.1.0.1", 40000 + i) for i in range(64)]
        flows += [(f"2001:db8:c::{i + 1:x}", "2001:db8:1::1", 40000 + i) for i in range(32)]  # GRE over IPv6
        rounds = 4
        for r in range(rounds):
            for src, dst, sport in flows:
                if ":" in src:
                    frame = gre_frame(v.lb_mac, v.peer_mac, v.peer_ip6, v.lb_ip6, tcp6(src, dst, sport, 443, bytes([r])))
                else:
                    frame = gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, ipv4(src, dst, 17, udp(sport, 80, bytes([r]))))
                cap.send(frame)
        got = drain(cap, lambda f: from_lb(v)(f) or (f[6:12] == v.lb_mac and f[12:14] == b"\x86\xdd" and f[20] == 47),
                    len(flows) * rounds, timeout=10)
        report = engine.stop()
    workers_of: dict[bytes, set[int]] = {}
    for f in got:
        inner_src = f[14 + 24 + 12 : 14 + 24 + 16] if f[12:14] == b"\x08\x00" else f[14 + 44 + 8 : 14 + 44 + 24]
        workers_of.setdefault(inner_src, set()).add(int.from_bytes(f[-4:], "big"))
    assert len(workers_of) == len(flows)
    assert all(len(pids) == 1 for pids in workers_of.values()), "a flow moved between workers"
    assert len(set().union(*workers_of.values())) == 2, "flows were not spread over both workers"
    assert len({next(iter(p)) for a, p in workers_of.items() if len(a) == 16}) == 2, "IPv6 flows on one worker"
    assert report.counters.engine["rx_packets"] == len(flows) * rounds, "each frame reached exactly one worker"
    assert report.counters.engine["workers"] == 2


def catch_all(*backends: str) -> DataplaneState:
    return StateBuilder(251).build({ServiceKey.catch_all(): {ip_address(b): 1 for b in backends}})


def test_with_the_real_balancer_resolves_the_backend_and_forwards(veth: VethPair) -> None:
    """End to end with rusty_rail.core: the backend (the peer) was never contacted from the lb before."""
    v = veth
    cap = v.peer_packet_socket()
    with EngineProcess(v, catch_all(v.peer_ip)) as engine:
        inner = ipv4("10.0.0.1", "10.1.0.1", 6, bytes(20))
        frame = gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, inner)

        sent = [0]

        def forwarded() -> list[bytes]:
            cap.send(frame)  # the first ones may be NO_NEIGHBOUR drops while the kernel resolves
            sent[0] += 1
            return pending(cap, lambda f: from_lb(v)(f) and f[0:6] == v.peer_mac)

        def settled() -> Counters | None:  # every frame sent so far forwarded, or dropped while resolving
            c = engine.counters()
            return c if c.forwarded + c.drops["no_neighbour"] == sent[0] else None

        with pytest.raises(RuntimeError, match="'lb0' has no global IPv6 address, and backend 2001:db8::9 is IPv6"):
            engine.apply(catch_all(v.peer_ip, "2001:db8::9"))  # refused: it keeps serving the state it had
        out = wait_for(forwarded, timeout=10, interval=0.05)[0]
        assert out[30:34] == socket.inet_aton(v.peer_ip)  # outer destination: the backend
        assert out[26:30] == socket.inet_aton(v.lb_ip)  # outer source: the device's address
        assert out[38:] == inner
        counters = wait_for(settled, what="every frame handled")
        assert counters.forwarded >= 1
        assert counters.backends[(ServiceKey.catch_all(), IPv4Address(v.peer_ip))][0] == counters.forwarded

        # A state applied while the packet loop runs takes effect: no services, no relay.
        engine.apply(DataplaneState())
        cap.send(frame)
        wait_for(lambda: engine.counters().drops["no_service"] == 1, what="a NO_SERVICE drop")
        report = engine.stop()
    assert report.counters.forwarded == counters.forwarded
    assert report.counters.engine["neighbour_refreshes"] >= 1


def test_two_workers_get_only_changes_add_up_and_explain_finds_the_entry(veth: VethPair) -> None:
    v = veth
    a, b = ServiceKey.parse("10.1.0.1:80/udp"), ServiceKey.parse("10.1.0.2:80/udp")
    peer, other = IPv4Address(v.peer_ip), IPv4Address("10.77.0.3")
    builder = StateBuilder(251)
    first = builder.build({a: {peer: 1}, b: {peer: 1}})
    cap = v.peer_packet_socket()
    flows = [FlowKey(IPv4Address(f"10.0.0.{i + 1}"), IPv4Address("10.1.0.1"), 17, 40000 + i, 80) for i in range(64)]
    sent = [0]
    with EngineProcess(v, first, workers=2) as engine:
        def send_all() -> int:
            for flow in flows:
                inner = ipv4(str(flow.src), str(flow.dst), 17, udp(flow.sport, flow.dport, b"x"))
                cap.send(gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, inner))
            sent[0] += len(flows)
            return engine.counters().forwarded

        def settled() -> Counters | None:  # every frame sent so far forwarded, or dropped while resolving
            c = engine.counters()
            return c if c.forwarded + c.drops["no_neighbour"] == sent[0] else None

        wait_for(lambda: send_all() >= len(flows), timeout=10, interval=0.2, what="forwards from both workers")
        before = wait_for(settled, what="every frame handled")
        assert before.engine["workers"] == 2 and before.engine["services_sent"] == 0  # forked with the state
        assert before.connections == len(flows) and before.flows == {(a, peer): len(flows)}
        packets, nbytes = before.backends[(a, peer)]
        assert packets == before.forwarded and nbytes == packets * 29  # inner IPv4 + UDP + 1 byte
        assert before.backends[(b, peer)] == (0, 0)

        engine.apply(builder.build({a: {peer: 1}, b: {peer: 1}}))  # equal: nothing to send
        assert engine.counters().engine["services_sent"] == 0
        engine.apply(builder.build({a: {peer: 1}, b: {peer: 1, other: 1}}))  # only b changed
        after = engine.counters()
        assert after.engine["services_sent"] == 2, "one service, to each of two workers"
        assert after.engine["pools_built"] == before.engine["pools_built"] + 2
        assert after.backends[(a, peer)] == (packets, nbytes), "service a's pool (and figures) kept"

        # Each flow's entry is in one worker only; the engine answers from that one.
        for flow in flows[:8]:
            assert engine.explain(flow).reason == "connection entry"
        unknown = FlowKey(IPv4Address("10.0.9.9"), IPv4Address("10.1.0.1"), 17, 1, 80)
        assert engine.explain(unknown).reason.startswith("table slot ")

        engine.apply(builder.build({a: {peer: 1}}))  # b removed: only its key travels
        assert engine.counters().engine["services_sent"] == 2
        report = engine.stop()
    assert report.counters.forwarded >= len(flows)
    assert report.counters.engine["workers"] == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_missing_device_is_a_clear_error(veth: VethPair, workers: int) -> None:
    from rusty_rail.engines.afpacket import AfPacketEngine

    with veth.inside(veth.lb_ns):
        with pytest.raises(EngineError, match="'nosuchdev' does not exist"):
            AfPacketEngine(EngineOptions("nosuchdev", workers=workers)).start()
        veth.ip(veth.lb_ns, "addr", "flush", "dev", veth.lb_dev)
        engine = AfPacketEngine(EngineOptions(veth.lb_dev, workers=workers))
        with pytest.raises(EngineError, match="has no IPv4 and no global IPv6 address"):
            engine.start()
        assert not engine.ready
        engine.close()
        # An address of one family is not enough for a backend of the other (docs/WIRE.md section 8).
        veth.ip(veth.lb_ns, "-6", "addr", "add", "2001:db8:77::1/64", "dev", veth.lb_dev, "nodad")
        engine = AfPacketEngine(EngineOptions(veth.lb_dev, workers=workers))
        engine.apply(catch_all("2001:db8:77::2", "10.77.0.2"))
        with pytest.raises(EngineError, match="'lb0' has no IPv4 address, and backend 10.77.0.2 is IPv4"):
            engine.start()
        engine.close()
    assert "rusty_rail" not in veth.run(veth.lb_ns, "nft", "list", "tables").stdout, "nothing was installed"
