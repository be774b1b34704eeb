"""The XDP runtime engine (engines/xdp_engine.py) in a throwaway namespace pair:

    lb namespace:   lb0   10.77.0.1/24  the engine, XDP attached natively
    peer namespace: peer0 10.77.0.2/24  xdp_pass.o attached (XDP_TX on a veth needs an XDP peer);
                                        sends GRE with AF_PACKET and receives what comes back

Backends: 10.77.0.2 (directly connected) and 10.2.0.1 (routed via 10.77.0.2): both resolve, through
the kernel's ARP, to the peer's MAC. Nothing here touches the host's interfaces.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rusty_rail.bpf import libbpf
from rusty_rail.core.balancer import Balancer
from rusty_rail.engines.xdp import attach_xdp_pass, default_object_path, xdp_pass_object_path
from rusty_rail.config import EngineKind
from rusty_rail.daemon import choose_engine
from rusty_rail.engines.xdp_engine import XdpEngine, xdp_available
from tests.engine_netns import LB_IP, PEER_IP, VethPair, drain, gre_frame, ipv4, ping, udp

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not (default_object_path().exists() and xdp_pass_object_path().exists()),
                       reason="run `make bpf` first"),
]

BACKENDS = [PEER_IP, "10.2.0.1"]
REPO = Path(__file__).resolve().parent.parent
_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """This thread only (setns is per thread), unlike pyroute2's pushns, whose stack is global."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(there, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            _libc.setns(here, 0x40000000)
    finally:
        os.close(here)
        os.close(there)


@pytest.fixture
def pair():
    p = VethPair()
    try:
        p.ip(p.lb_ns, "route", "add", "10.2.0.0/24", "via", PEER_IP)
        with in_netns(p.peer_ns):
            attach_xdp_pass(p.peer_dev)
        yield p
    finally:
        p.close()


def factory(pair: VethPair):
    return lambda: Balancer(LB_IP, pair.lb_mac, BACKENDS, table_size=251)


def attached_id(pair: VethPair) -> int:
    with in_netns(pair.lb_ns):
        return libbpf.xdp_query_id(pair.lb_ifindex, 0)


def gre_frames(pair: VethPair, count: int) -> list[bytes]:
    return [gre_frame(pair.lb_mac, pair.peer_mac, PEER_IP, LB_IP,
                      ipv4("10.0.0.1", "10.1.0.1", 17, udp(30000 + i, 53, b"q%d" % i)))
            for i in range(count)]


def expected_outputs(pair: VethPair, frames: list[bytes]) -> set[bytes]:
    reference = factory(pair)()
    for b in BACKENDS:
        reference.set_neighbour(b, pair.peer_mac)
    return {reference.decide(f, now=0.0).frame for f in frames}


def is_forwarded(pair: VethPair):
    return lambda f: f[6:12] == pair.lb_mac and f[12:14] == b"\x08\x00" and f[23] == 47


def test_xdp_is_available_here() -> None:
    ok, why = xdp_available()
    assert ok, why
    assert choose_engine(EngineKind.AUTO)[0] == EngineKind.XDP
    assert choose_engine(EngineKind.XDP)[0] == EngineKind.XDP
    assert choose_engine(EngineKind.AFPACKET) == (EngineKind.AFPACKET, "RR_ENGINE=afpacket")
    missing = xdp_available("/nonexistent/xdp_balancer.o")
    assert missing[0] is False and "make bpf" in missing[1]


def test_engine_forwards_keeps_host_traffic_and_detaches(pair) -> None:
    engine = XdpEngine(pair.lb_dev, factory(pair), conn_capacity=4096)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with in_netns(pair.lb_ns):
                engine.serve_forever(stop)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="xdp-engine")
    thread.start()
    try:
        assert engine.ready.wait(10), errors
        assert engine.resolved.wait(10), "backends' next hops never resolved (ARP through the XDP program)"
        assert attached_id(pair) != 0

        # GRE in from the peer, re-encapsulated frames back to it (XDP_TX).
        frames = gre_frames(pair, 20)
        sock = pair.peer_packet_socket()
        try:
            for f in frames:
                sock.send(f)
            got = drain(sock, is_forwarded(pair), count=len(frames))
        finally:
            sock.close()
        assert set(got) == expected_outputs(pair, frames)
        assert engine.counters()["forwarded"] == len(frames)

        # Host traffic is untouched: ICMP echo and a TCP exchange with the lb namespace.
        ping(pair, pair.peer_ns, LB_IP)
        with in_netns(pair.lb_ns):
            server = socket.create_server((LB_IP, 0))
        try:
            port = server.getsockname()[1]
            with in_netns(pair.peer_ns):
                client = socket.create_connection((LB_IP, port), timeout=5)
            conn, _ = server.accept()
            with client, conn:
                client.sendall(b"hello over tcp")
                assert conn.recv(100) == b"hello over tcp"
        finally:
            server.close()
        assert engine.counters()["passed"] > 0
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert not errors, errors
    assert attached_id(pair) == 0  # clean detach


# -- a separate process: killed (leaves its program and pins), then replaced, then SIGTERM -------------

_SCRIPT = """
import ctypes, os, sys, threading
ns, dev, mac, pin_dir = sys.argv[1:5]
fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
assert ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) == 0
from rusty_rail.core.balancer import Balancer
from rusty_rail.engines.xdp_engine import XdpEngine
engine = XdpEngine(dev, lambda: Balancer(%r, bytes.fromhex(mac), %r, table_size=251),
                   conn_capacity=1024, pin_dir=pin_dir)
def announce():
    if engine.ready.wait(30) and engine.resolved.wait(30):
        print("ready", engine.replaced_program_id, flush=True)
threading.Thread(target=announce, daemon=True).start()
engine.serve_forever()
print("stopped", flush=True)
""" % (LB_IP, BACKENDS)


def start_engine(pair: VethPair, pin_dir: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, pair.lb_ns, pair.lb_dev, pair.lb_mac.hex(), pin_dir],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().split() if ready else []
    assert line[:1] == ["ready"], f"engine did not start: {line!r}, exit {proc.poll()}"
    return proc, int(line[1])


def test_killed_run_is_replaced_and_sigterm_cleans_up(pair) -> None:
    pin_dir = f"/sys/fs/bpf/rre{secrets.token_hex(3)}"
    procs: list[subprocess.Popen[str]] = []
    try:
        first, replaced = start_engine(pair, pin_dir)
        procs.append(first)
        assert replaced == 0
        leftover = attached_id(pair)
        assert leftover != 0 and "rr_conns" in os.listdir(pin_dir)
        first.kill()  # SIGKILL: no cleanup; the program stays attached and the pins stay
        first.wait(10)
        assert attached_id(pair) == leftover and os.listdir(pin_dir)

        second, replaced = start_engine(pair, pin_dir)
        procs.append(second)
        assert replaced == leftover
        assert attached_id(pair) not in (0, leftover)
        # The replacement forwards (its pins replaced the dead run's pins too).
        frames = gre_frames(pair, 3)
        sock = pair.peer_packet_socket()
        try:
            for f in frames:
                sock.send(f)
            assert set(drain(sock, is_forwarded(pair), count=len(frames))) == expected_outputs(pair, frames)
        finally:
            sock.close()

        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=10)
        assert second.returncode == 0 and "stopped" in out
        assert attached_id(pair) == 0
        assert not os.path.exists(pin_dir)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        if os.path.isdir(pin_dir):
            for name in os.listdir(pin_dir):
                os.unlink(os.path.join(pin_dir, name))
            os.rmdir(pin_dir)
