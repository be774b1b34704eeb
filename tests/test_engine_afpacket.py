"""The AF_PACKET engine in a namespace of its own, fed from a peer namespace over veth.

The engine runs in a forked child that has joined the lb namespace; the test talks to it only through the
wire (and nft's view of its table), as a router and a backend would.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from tests.engine_netns import (
    VethPair,
    drain,
    gre_frame,
    ipv4,
    is_icmp_protocol_unreachable,
    ping,
    pending,
    udp,
    wait_for,
)
from pyroute2 import netns

from rusty_rail.core.verdict import PASS, Drop, DropReason, Forward
from rusty_rail.engines import hostfilter

pytestmark = pytest.mark.netns

CTX = multiprocessing.get_context("fork")


class RunningEngine:
    def __init__(self, veth: VethPair, make: Callable[[], Any], workers: int = 1, **options: Any) -> None:
        self.veth = veth
        self.results: Any = CTX.Queue()
        self.proc = CTX.Process(target=self._main, args=(make, workers, options))
        self.proc.start()
        wait_for(lambda: "gre_to_engine" in (self.table() or "") or not self.proc.is_alive(), timeout=20)
        assert self.proc.is_alive(), "engine died while starting"

    def _main(self, make: Callable[[], Any], workers: int, options: dict[str, Any]) -> None:
        from rusty_rail.engines.afpacket import AfPacketEngine

        netns.setns(self.veth.lb_ns)
        if workers == 1:
            engine = AfPacketEngine(self.veth.lb_dev, make(), **options)
        else:
            engine = AfPacketEngine(self.veth.lb_dev, workers=workers, factory=make, **options)
        self.results.put(engine.serve_forever())

    def table(self) -> str | None:
        done = self.veth.run(self.veth.lb_ns, "nft", "list", "table", "netdev", hostfilter.table_name("lb0"),
                             check=False)
        return done.stdout if done.returncode == 0 else None

    def stop(self) -> Any:
        os.kill(self.proc.pid, signal.SIGTERM)
        stats = self.results.get(timeout=10)
        self.proc.join(10)
        assert self.proc.exitcode == 0
        return stats

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def swap_and_mark(frame: bytes, now: float) -> Any:
    """Stand-in balancer: GRE whose inner UDP payload says so is dropped or passed, else sent back
    to its sender with MACs swapped and 3 bytes appended (so the test knows the engine sent *this*)."""
    if frame[23] != 47:
        return PASS
    if frame.endswith(b"DROP"):
        return Drop(DropReason.NO_BACKEND)
    if frame.endswith(b"PASS"):
        return PASS
    return Forward(frame[6:12] + frame[0:6] + frame[12:] + b"OUT", 0)


def expected(frame: bytes) -> bytes | None:
    v = swap_and_mark(frame, 0.0)
    return v.frame if isinstance(v, Forward) else None


def from_lb(v: VethPair) -> Callable[[bytes], bool]:
    return lambda f: f[6:12] == v.lb_mac and f[12:14] == b"\x08\x00" and f[23] == 47


def test_forwards_exactly_what_decide_returns_and_host_traffic_still_works(veth: VethPair) -> None:
    v = veth
    cap = v.peer_packet_socket()
    # Control: without the engine, the lb host answers GRE with ICMP protocol unreachable.
    probe = gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, ipv4("10.0.0.1", "10.1.0.1", 17, udp(1, 2, b"x")))
    cap.send(probe)
    drain(cap, is_icmp_protocol_unreachable, 1)

    engine = RunningEngine(v, lambda: swap_and_mark)
    try:
        frames = []
        for i, size in enumerate([0, 1, 10, 100, 1000, 1400]):
            inner = ipv4(f"10.0.0.{i + 1}", "10.1.0.1", 17, udp(1000 + i, 80, bytes(size)))
            frames.append(gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, inner))
        for tail in (b"DROP", b"PASS"):
            frames.append(gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip,
                                    ipv4("10.0.0.9", "10.1.0.1", 17, udp(9, 9, tail))))
        for f in frames:
            cap.send(f)
        want = [e for e in map(expected, frames) if e is not None]
        got = drain(cap, from_lb(v), len(want))
        assert got == want

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
        queued = pending(cap, lambda f: is_icmp_protocol_unreachable(f) or from_lb(v)(f))
        assert queued == []
        assert f"counter packets {len(frames)} " in (engine.table() or "")
        stats = engine.stop()
    finally:
        engine.kill()
    assert engine.table() is None, "the nft table must go with the engine"
    assert stats.rx_packets == len(frames), "the socket filter keeps ARP, ICMP and TCP out of the ring"
    assert stats.tx_ring == len(want)
    assert stats.tx_failed == 0


def test_replaces_a_leftover_table_and_removes_it_on_stop(veth: VethPair) -> None:
    v = veth
    table = hostfilter.table_name(v.lb_dev)
    script = f'table netdev {table} {{ chain stale {{ type filter hook ingress device "{v.lb_dev}" priority 0; }}; }}'
    subprocess.run(["ip", "netns", "exec", v.lb_ns, "nft", "-f", "-"], input=script, text=True, check=True)
    engine = RunningEngine(v, lambda: swap_and_mark)
    try:
        listing = engine.table() or ""
        assert "gre_to_engine" in listing and "stale" not in listing
        engine.stop()
    finally:
        engine.kill()
    assert engine.table() is None


def worker_marker() -> Callable[[bytes, float], Any]:
    """Stand-in for a per-worker balancer: appends the pid of the worker that decided."""
    def decide(frame: bytes, now: float) -> Any:
        if frame[23] != 47:
            return PASS
        return Forward(frame[6:12] + frame[0:6] + frame[12:] + os.getpid().to_bytes(4, "big"), 0)
    return decide


def test_fanout_keeps_each_flow_on_one_worker_and_spreads_flows(veth: VethPair) -> None:
    v = veth
    cap = v.peer_packet_socket()
    engine = RunningEngine(v, worker_marker, workers=2)
    try:
        flows = [(f"10.0.{i // 200}.{i % 200 + 1}", "10.1.0.1", 40000 + i) for i in range(64)]
        rounds = 4
        for r in range(rounds):
            for src, dst, sport in flows:
                inner = ipv4(src, dst, 17, udp(sport, 80, bytes([r])))
                cap.send(gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, inner))
        got = drain(cap, from_lb(v), len(flows) * rounds, timeout=10)
        stats = engine.stop()
    finally:
        engine.kill()
    workers_of: dict[bytes, set[int]] = {}
    for f in got:
        inner_src = f[14 + 24 + 12 : 14 + 24 + 16]
        workers_of.setdefault(inner_src, set()).add(int.from_bytes(f[-4:], "big"))
    assert len(workers_of) == len(flows)
    assert all(len(pids) == 1 for pids in workers_of.values()), "a flow moved between workers"
    used = set().union(*workers_of.values())
    assert len(used) == 2, "flows were not spread over both workers"
    assert stats.rx_packets == len(flows) * rounds, "each frame reached exactly one worker"
    assert stats.workers == 2


def test_with_the_real_balancer_resolves_the_backend_and_forwards(veth: VethPair) -> None:
    """End to end with rusty_rail.core: the backend (the peer) was never contacted from the lb before."""
    from rusty_rail.core.balancer import Balancer

    v = veth
    cap = v.peer_packet_socket()

    def make() -> Any:
        return Balancer(local_address=v.lb_ip, local_mac=v.lb_mac, backends=[v.peer_ip])

    engine = RunningEngine(v, make)
    try:
        inner = ipv4("10.0.0.1", "10.1.0.1", 6, bytes(20))
        frame = gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, inner)

        def forwarded() -> list[bytes]:
            cap.send(frame)  # the first ones may be NO_NEIGHBOUR drops while the kernel resolves
            return pending(cap, lambda f: from_lb(v)(f) and f[0:6] == v.peer_mac)

        out = wait_for(forwarded, timeout=10, interval=0.05)[0]
        assert out[30:34] == socket.inet_aton(v.peer_ip)  # outer destination: the backend
        assert out[26:30] == socket.inet_aton(v.lb_ip)  # outer source: the device's address
        assert out[38:] == inner
        stats = engine.stop()
    finally:
        engine.kill()
    assert stats.balancer["forwarded"] >= 1
    assert stats.neighbour_refreshes >= 1


def test_missing_device_is_a_clear_error(veth: VethPair) -> None:
    from rusty_rail.engines.afpacket import AfPacketEngine
    from rusty_rail.engines.neighbours import DeviceError

    with veth.inside(veth.lb_ns):
        with pytest.raises(DeviceError, match="does not exist"):
            AfPacketEngine("nosuchdev", swap_and_mark).run(_Never())
        veth.ip(veth.lb_ns, "addr", "flush", "dev", veth.lb_dev)
        with pytest.raises(DeviceError, match="no IPv4 address"):
            AfPacketEngine(veth.lb_dev, swap_and_mark).run(_Never())


class _Never:
    def is_set(self) -> bool:
        return False
