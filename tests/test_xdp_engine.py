"""The XDP engine (engines/xdp/engine.py) in a throwaway namespace pair:

    lb namespace:   lb0   10.77.0.1/24  the engine, XDP attached natively
    peer namespace: peer0 10.77.0.2/24  xdp_pass.o attached (XDP_TX on a veth needs an XDP peer);
                                        sends GRE with AF_PACKET and receives what comes back

Backends: 10.77.0.2 (directly connected) and 10.2.0.1 (routed via 10.77.0.2): both resolve, through
the kernel's ARP, to the peer's MAC. Nothing here touches the host's interfaces.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from rusty_rail.bpf import libbpf
from rusty_rail.core.balancer import Balancer
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import ServiceKey
from rusty_rail.dataplane import EngineError, EngineKind, EngineOptions, XdpMode
from rusty_rail.engines import choose_engine
from rusty_rail.engines.xdp import XdpEngine, attach_pass, default_object_path, handover_dir, xdp_available
from rusty_rail.engines.xdp.program import running_mode
from rusty_rail.bpf.netns import in_netns
from tests.engine_netns import LB_IP, PEER_IP, VethPair, drain, gre_frame, ipv4, ping, udp, wait_for
from tests.xdp_support import catch_all_state

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not default_object_path().exists(), reason="run `make bpf` first"),
]

BACKENDS = [PEER_IP, "10.2.0.1"]
ALL = ServiceKey.catch_all()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def pair():
    p = VethPair()
    try:
        p.ip(p.lb_ns, "route", "add", "10.2.0.0/24", "via", PEER_IP)
        attach_pass(p.peer_dev, netns=p.peer_ns)
        yield p
    finally:
        p.close()


@pytest.fixture
def pin_root():
    root = f"/sys/fs/bpf/rre{secrets.token_hex(3)}"
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def reference(pair: VethPair, backends=BACKENDS) -> Balancer:
    balancer = Balancer(LB_IP, pair.lb_mac, catch_all_state(backends, 251).services)
    for b in backends:
        balancer.set_neighbour(b, pair.peer_mac)
    return balancer


def attached_id(pair: VethPair) -> int:
    with in_netns(pair.lb_ns):
        return libbpf.xdp_query_id(pair.lb_ifindex, 0)


def gre_frames(pair: VethPair, count: int, first: int = 30000) -> list[bytes]:
    return [gre_frame(pair.lb_mac, pair.peer_mac, PEER_IP, LB_IP,
                      ipv4("10.0.0.1", "10.1.0.1", 17, udp(first + i, 53, b"q%d" % i)))
            for i in range(count)]


def is_forwarded(pair: VethPair):
    return lambda f: f[6:12] == pair.lb_mac and f[12:14] == b"\x08\x00" and f[23] == 47


def resolved(engine: XdpEngine) -> bool:
    program = engine.program
    return program is not None and all(e.mac for e in program.image.backends.values())


class Running:
    """An engine started and served in a thread of its own inside the lb namespace."""

    def __init__(self, pair: VethPair, engine: XdpEngine) -> None:
        self.engine, self.stop, self.errors, self.report = engine, threading.Event(), [], None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(pair,), name="xdp-engine")
        self.thread.start()
        assert self.started.wait(10) and not self.errors, self.errors
        wait_for(lambda: resolved(engine), 10, what="backends' next hops resolved (ARP through the program)")

    def _run(self, pair: VethPair) -> None:
        try:
            with in_netns(pair.lb_ns):
                self.engine.start()
                self.started.set()
                self.report = self.engine.serve(self.stop)
        except BaseException as exc:  # reported by the main thread
            self.errors.append(exc)
            self.started.set()
        finally:
            self.engine.close()

    def finish(self):
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive() and not self.errors, self.errors
        return self.report


def send(pair: VethPair, frames: list[bytes]) -> set[bytes]:
    sock = pair.peer_packet_socket()
    try:
        for f in frames:
            sock.send(f)
        return set(drain(sock, is_forwarded(pair), count=len(frames)))
    finally:
        sock.close()


def test_xdp_is_available_here() -> None:
    options = EngineOptions(device="lo")
    ok, why = xdp_available(options)
    assert ok, why
    assert choose_engine(EngineKind.AUTO, options)[0] == EngineKind.XDP
    assert choose_engine(EngineKind.XDP, options)[0] == EngineKind.XDP
    assert choose_engine(EngineKind.AFPACKET, options) == (EngineKind.AFPACKET, "engine afpacket asked for")
    missing = xdp_available(options, object_path="/nonexistent/xdp_balancer.o")
    assert missing[0] is False and "make bpf" in missing[1]


def test_a_missing_device_is_an_engine_error() -> None:
    engine = XdpEngine(EngineOptions(device="rr-no-such-if0"))
    with pytest.raises(EngineError, match="rr-no-such-if0"):
        engine.start()
    engine.close()


def test_engine_forwards_keeps_host_traffic_and_detaches(pair, pin_root) -> None:
    engine = XdpEngine(EngineOptions(device=pair.lb_dev, connection_capacity=4096, pin_root=pin_root))
    engine.apply(catch_all_state(BACKENDS, 251))  # before start: written before attaching
    assert not engine.ready
    run = Running(pair, engine)
    try:
        assert engine.ready and attached_id(pair) != 0
        # GRE in from the peer, re-encapsulated frames back to it (XDP_TX).
        frames = gre_frames(pair, 20)
        python = reference(pair)
        assert send(pair, frames) == {python.decide(f, now=time.monotonic()).frame for f in frames}
        c = engine.counters()
        assert c.ready and c.forwarded == len(frames) and c.engine["conn_new"] == len(frames)

        # Host traffic is untouched: ICMP echo and a TCP exchange with the lb namespace.
        ping(pair, pair.peer_ns, LB_IP)
        with in_netns(pair.lb_ns):
            server = socket.create_server((LB_IP, 0))
        try:
            with in_netns(pair.peer_ns):
                client = socket.create_connection((LB_IP, server.getsockname()[1]), timeout=5)
            conn, _ = server.accept()
            with client, conn:
                client.sendall(b"hello over tcp")
                assert conn.recv(100) == b"hello over tcp"
        finally:
            server.close()
        assert engine.counters().passed > 0
    finally:
        report = run.finish()
    assert report is not None and not report.handed_over and report.engine == EngineKind.XDP
    assert report.counters.forwarded == len(frames)
    assert attached_id(pair) == 0  # clean detach
    assert not os.path.exists(pin_root) or not os.listdir(pin_root)
    assert engine.counters().ready is False


def test_counters_and_explain_match_the_python_core(pair, pin_root) -> None:
    engine = XdpEngine(EngineOptions(device=pair.lb_dev, connection_capacity=4096, pin_root=pin_root))
    engine.apply(catch_all_state([BACKENDS[0]], 251))
    run = Running(pair, engine)
    try:
        python = reference(pair, BACKENDS)
        state = catch_all_state(BACKENDS, 251)
        engine.apply(state)
        python.set_services(state.services)
        wait_for(lambda: resolved(engine), 10, what="the new backend's next hop")
        frames = gre_frames(pair, 30)
        assert send(pair, frames) == {python.decide(f, now=time.monotonic()).frame for f in frames}
        c = engine.counters()
        assert c.forwarded == 30 and c.connections == 30 and c.connection_evictions == 0
        assert dict(c.backends) == python.backend_figures()
        assert dict(c.flows) == {key: n for key, (n, _) in python.backend_figures().items() if n}
        with pytest.raises(ValueError, match="'lb0' has no global IPv6 address, and backend 2001:db8::9 is IPv6"):
            engine.apply(catch_all_state([*BACKENDS, "2001:db8::9"], 251))  # refused: the maps stay as they were
        assert c.drops["no_service"] == 0 and set(c.drops) == {"outer_bad_ihl", "outer_options", "outer_bad_length",
                                                                "outer_bad_checksum", "outer_fragment", "gre_truncated",
                                                                "gre_version", "gre_reserved", "gre_checksum",
                                                                "gre_protocol", "inner_truncated", "inner_version",
                                                                "inner_bad_ihl", "inner_bad_length", "no_backend",
                                                                "no_neighbour", "no_service", "tx_failed",
                                                                "tx_refused", "inner_ext_headers", "output_too_big",
                                                                "icmp_rate_limited"}
        assert c.drops["tx_refused"] == 0  # the peer runs XDP_PASS: native XDP_TX delivers
        for f in frames:
            inner = f[38:]
            key = FlowKey(IPv4Address(inner[12:16]), IPv4Address(inner[16:20]), inner[9],
                          *struct.unpack("!HH", inner[20:24]))
            answer = engine.explain(key)
            assert (answer.backend, answer.reason) == python.explain(key, time.monotonic())
            assert answer.reason == "connection entry"
        unseen = FlowKey(IPv4Address("10.0.0.9"), IPv4Address("10.1.0.1"), 6, 1, 80)
        assert engine.explain(unseen).reason.startswith("table slot")
        assert (engine.explain(unseen).backend, engine.explain(unseen).reason) == python.explain(unseen, 0.0)
        # A backend added by the control plane shows up at once, from zero.
        engine.apply(catch_all_state(BACKENDS + ["10.2.0.7"], 251))
        assert engine.counters().backends[(ALL, IPv4Address("10.2.0.7"))] == (0, 0)
        with pytest.raises(ValueError):  # more slots than rr_maglev was sized for: refused, nothing changes
            engine.apply(catch_all_state(BACKENDS, 257))
        assert engine.counters().backends[(ALL, IPv4Address("10.2.0.7"))] == (0, 0)
    finally:
        run.finish()


def test_handover_keeps_the_program_and_the_flows(pair, pin_root) -> None:
    """hand_over + stop leaves the program attached with rr_conns pinned; the next engine takes the
    connection table and the backend indices, replaces the program atomically, removes the pins."""
    options = EngineOptions(device=pair.lb_dev, connection_capacity=4096, pin_root=pin_root)
    first = XdpEngine(options)
    first.apply(catch_all_state(BACKENDS, 251))
    run = Running(pair, first)
    frames = gre_frames(pair, 20)
    before = send(pair, frames)
    old_id = attached_id(pair)
    assert first.hand_over(pin_root) is True
    report = run.finish()
    assert report.handed_over and attached_id(pair) == old_id
    with in_netns(pair.lb_ns):
        directory = handover_dir(pair.lb_dev, pin_root)
    assert sorted(os.listdir(directory)) == ["rr_backends", "rr_conns", "rr_conns6"]
    assert send(pair, gre_frames(pair, 3, first=31000))  # the old program still forwards, on its own

    # The successor lists the backends the other way round and one more: the indices stay the old ones.
    second = XdpEngine(options)
    second.apply(catch_all_state(["10.2.0.9"] + BACKENDS, 251))
    run = Running(pair, second)
    try:
        assert second.took_over_program_id == old_id and second.adopted_connections
        assert attached_id(pair) not in (0, old_id)
        assert not os.path.exists(directory)
        c = second.counters()
        assert c.connections == 23  # the predecessor's entries
        assert send(pair, frames) == before  # every flow stays on its backend
        assert second.counters().engine["conn_hit"] == 20
    finally:
        run.finish()
    assert attached_id(pair) == 0


def test_a_handover_that_cannot_pin_changes_nothing(pair, pin_root, tmp_path: Path) -> None:
    """hand_over into a pin root that is no bpffs (and must not be mounted over) fails with the reason:
    the program stays attached and forwarding, and the stop is still a plain one. A handover made and
    then undone (its restarter never got the answer) leaves no pins."""
    engine = XdpEngine(EngineOptions(device=pair.lb_dev, connection_capacity=4096, pin_root=pin_root))
    engine.apply(catch_all_state(BACKENDS, 251))
    run = Running(pair, engine)
    try:
        frames = gre_frames(pair, 10)
        before, attached = send(pair, frames), attached_id(pair)
        full = tmp_path / "full"
        full.mkdir()
        (full / "something").write_text("")
        with pytest.raises(EngineError, match="not a bpffs"):
            engine.hand_over(str(full))
        assert not engine.handed_over and attached_id(pair) == attached and send(pair, frames) == before
        assert engine.hand_over(pin_root) and os.listdir(pin_root)
        engine.cancel_handover()
        assert not engine.handed_over and os.listdir(pin_root) == []
    finally:
        report = run.finish()
    assert not report.handed_over and attached_id(pair) == 0  # a plain stop detaches


def test_start_replaces_a_running_program_in_its_mode_never_detaching(pair, pin_root, monkeypatch) -> None:
    """A predecessor whose pins this engine cannot see (another pin root here; another bpffs instance
    in life): its program, attached generic, is replaced atomically, in generic mode although native is
    asked for (native would need a detach first). Nothing is detached on the way."""
    first = XdpEngine(EngineOptions(device=pair.lb_dev, connection_capacity=4096, pin_root=pin_root,
                                    xdp_mode=XdpMode.GENERIC))
    first.apply(catch_all_state(BACKENDS, 251))
    run = Running(pair, first)
    assert first.hand_over(pin_root)
    run.finish()
    old_id = attached_id(pair)

    def no_detach(*args: object) -> None:
        raise AssertionError("start() detached a program")

    second = XdpEngine(EngineOptions(device=pair.lb_dev, connection_capacity=4096, pin_root=pin_root + "-other",
                                     xdp_mode=XdpMode.NATIVE))
    second.apply(catch_all_state(BACKENDS, 251))
    monkeypatch.setattr(libbpf, "xdp_detach", no_detach)
    run = Running(pair, second)
    try:
        assert second.replaced_program_id == old_id and second.took_over_program_id == 0
        assert not second.adopted_connections
        with in_netns(pair.lb_ns):
            assert running_mode(pair.lb_ifindex) == "skb" and attached_id(pair) not in (0, old_id)
        assert send(pair, gre_frames(pair, 3))  # the replacement forwards
    finally:
        monkeypatch.undo()
        run.finish()
    assert attached_id(pair) == 0


# -- a separate process: killed (leaves its program), then replaced, then SIGTERM ----------------------

_SCRIPT = """
import os, signal, sys, threading, time
from rusty_rail.dataplane import EngineOptions
from rusty_rail.engines.xdp import XdpEngine
from rusty_rail.bpf.netns import in_netns
from tests.xdp_support import catch_all_state
ns, dev, pin_root = sys.argv[1:4]
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
with in_netns(ns):
    engine = XdpEngine(EngineOptions(dev, connection_capacity=1024, pin_root=pin_root))
    engine.apply(catch_all_state(%r, 251))
    engine.start()
    def announce():
        while True:
            p = engine.program
            if p is not None and all(e.mac for e in p.image.backends.values()):
                break
            time.sleep(0.01)
        print("ready", engine.replaced_program_id, flush=True)
    threading.Thread(target=announce, daemon=True).start()
    report = engine.serve(stop)
    engine.close()
print("stopped", report.handed_over, flush=True)
""" % (BACKENDS,)


def start_engine(pair: VethPair, pin_root: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, pair.lb_ns, pair.lb_dev, pin_root],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().split() if ready else []
    assert line[:1] == ["ready"], f"engine did not start: {line!r}, exit {proc.poll()}"
    return proc, int(line[1])


def test_killed_run_is_replaced_and_sigterm_cleans_up(pair, pin_root) -> None:
    procs: list[subprocess.Popen[str]] = []
    try:
        first, replaced = start_engine(pair, pin_root)
        procs.append(first)
        assert replaced == 0
        leftover = attached_id(pair)
        assert leftover != 0
        first.kill()  # SIGKILL: no cleanup; the program stays attached
        first.wait(10)
        assert attached_id(pair) == leftover

        second, replaced = start_engine(pair, pin_root)
        procs.append(second)
        assert replaced == leftover
        assert attached_id(pair) not in (0, leftover)
        frames = gre_frames(pair, 3)  # the replacement forwards
        python = reference(pair)
        assert send(pair, frames) == {python.decide(f, now=0.0).frame for f in frames}

        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=10)
        assert second.returncode == 0 and "stopped False" in out
        assert attached_id(pair) == 0
        assert not os.path.exists(pin_root) or not os.listdir(pin_root)  # a plain stop pins nothing
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
