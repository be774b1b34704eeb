"""Does a balancer keep each flow's packets in the order they arrived? Numbered segments, many flows,
both engines (XDP native and generic, AF_PACKET with two workers), run as people run it.

Reordering inside a flow is a correctness bug for a balancer: TCP reads three out-of-order segments
as a loss and retransmits. The places it could come from here: AF_PACKET's fanout (two workers, each
with its own rings), XDP_TX from two CPUs at once, native XDP's veth NAPI ring against generic XDP's
per-CPU backlogs.

    peer ns: peer0 10.77.0.2   two senders, pinned to CPU0 and CPU1, each owning half the flows;
                               a capture of what comes back (frames addressed to the backends)
    lb ns:   lb0   10.77.0.1   `python -m rusty_rail` (RR_DEVICE=lb0), backends 10.77.0.101-103 whose
                               permanent neighbour entries name peer0's MAC, so every forward returns

Each flow is sent by one sender on one CPU, so the order it reaches lb0 is the order it was sent; the
capture on peer0 shows the order it left the balancer. Every flow must come back complete, in order
and to one backend.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from rusty_rail.engines.xdp import attach_pass
from rusty_rail.lab.events import logged
from tests.engine_netns import LB_IP, PEER_IP, VethPair, gre_frame, ipv4, udp, wait_for

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

BACKENDS = ("10.77.0.101", "10.77.0.102", "10.77.0.103")
VIP, VPORT = "10.1.0.1", 80
FLOWS, SEGMENTS = 64, 64
CTX = multiprocessing.get_context("fork")
ENGINES = {  # name: (environment, attach XDP_PASS on the peer)
    "afpacket-2-workers": ({"RR_ENGINE": "afpacket", "RR_WORKERS": "2"}, False),
    "xdp-native": ({"RR_ENGINE": "xdp", "RR_XDP_MODE": "native"}, True),
    "xdp-generic": ({"RR_ENGINE": "xdp", "RR_XDP_MODE": "generic"}, False),
}


def segment(pair: VethPair, flow: int, number: int) -> bytes:
    """Flow `flow`'s segment `number`: the numbers ride in the UDP payload."""
    src = f"10.0.{flow // 250}.{flow % 250 + 1}"
    payload = flow.to_bytes(2, "big") + number.to_bytes(4, "big") + bytes(40)
    inner = ipv4(src, VIP, 17, udp(40000 + flow, VPORT, payload))
    return gre_frame(pair.lb_mac, pair.peer_mac, PEER_IP, LB_IP, inner)


def numbers(frame: bytes) -> tuple[str, int, int] | None:
    """(backend, flow, segment number) of a forwarded frame, None for anything else."""
    if len(frame) < 34 + 4 + 20 + 8 + 6 or frame[12:14] != b"\x08\x00" or frame[23] != 47:
        return None
    inner = frame[38:]
    if inner[9] != 17 or inner[16:20] != socket.inet_aton(VIP):
        return None
    body = inner[(inner[0] & 0xF) * 4 + 8:]
    return socket.inet_ntoa(frame[30:34]), int.from_bytes(body[:2], "big"), int.from_bytes(body[2:6], "big")


def send(sock: socket.socket, cpu: int, frames: list[bytes]) -> None:
    os.sched_setaffinity(0, {cpu % os.cpu_count()})  # type: ignore[operator]
    for frame in frames:
        while True:
            try:
                sock.send(frame)
                break
            except (BlockingIOError, OSError):  # ENOBUFS: the veth is full; send it again, in order
                time.sleep(0.0005)


class Capture:
    """Every forwarded frame peer0 receives, in arrival order, read by a thread while the test sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.seen = sock, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(2048)
            except (TimeoutError, socket.timeout):
                continue
            got = numbers(frame)
            if got:
                self.seen.append(got)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def pair() -> Iterator[VethPair]:
    p = VethPair()
    try:
        for backend in BACKENDS:
            p.ip(p.lb_ns, "neigh", "add", backend, "lladdr", p.peer_mac.hex(":"), "dev", p.lb_dev, "nud", "permanent")
        yield p
    finally:
        p.close()


def start_daemon(pair: VethPair, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", pair.lb_ns, sys.executable, "-m", "rusty_rail"],
            env={**os.environ, "RR_DEVICE": pair.lb_dev, "RR_TARGET_IPS": ";".join(BACKENDS), **env},
            stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: logged(log, "started") or proc.poll() is not None, 30, 0.05, "the daemon's started event")
    assert proc.poll() is None, log.read_text()[-2000:]
    return proc


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_every_flow_leaves_in_the_order_it_arrived(pair: VethPair, engine: str, tmp_path: Path) -> None:
    env, peer_xdp = ENGINES[engine]
    if peer_xdp:  # native XDP_TX on a veth delivers only to a peer that runs XDP (DESIGN.md)
        attach_pass(pair.peer_dev, mode="native", netns=pair.peer_ns)
    capture = Capture(pair.peer_packet_socket())
    with pair.inside(pair.peer_ns):
        senders = [socket.socket(socket.AF_PACKET, socket.SOCK_RAW) for _ in range(2)]
    for s in senders:
        s.bind((pair.peer_dev, 0))
    proc = start_daemon(pair, env, tmp_path / "daemon.log")
    try:
        # The daemon is up; wait until it forwards (next hops resolved) with a probe flow of its own.
        probe = segment(pair, FLOWS, 0)
        wait_for(lambda: senders[0].send(probe) and any(f == FLOWS for _, f, _ in capture.seen), 10, 0.05,
                 "a first forwarded frame")
        # Sender k owns flows k, k+2, ...; each sends its flows' segments round-robin, as many
        # concurrent connections would, from its own CPU.
        work = [[segment(pair, f, n) for n in range(SEGMENTS) for f in range(k, FLOWS, 2)] for k in range(2)]
        started = time.monotonic()
        procs = [CTX.Process(target=send, args=(senders[k], k, work[k])) for k in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        expected = FLOWS * SEGMENTS
        wait_for(lambda: sum(f < FLOWS for _, f, _ in capture.seen) >= expected, 10, 0.02,
                 f"{expected} forwarded segments")
        elapsed = time.monotonic() - started
    finally:
        capture.close()
        proc.terminate()
        proc.wait(10)
        for s in senders:
            s.close()
    by_flow: dict[int, list[int]] = defaultdict(list)
    backends: dict[int, set[str]] = defaultdict(set)
    for backend, flow, number in capture.seen:
        if flow < FLOWS:
            by_flow[flow].append(number)
            backends[flow].add(backend)
    out_of_order = {f: ns for f, ns in by_flow.items() if ns != sorted(ns)}
    print(f"\n{engine}: {FLOWS} flows x {SEGMENTS} segments from 2 CPUs in {elapsed:.2f} s; "
          f"flows out of order: {len(out_of_order)}")
    assert not out_of_order, {f: ns[:20] for f, ns in list(out_of_order.items())[:3]}
    assert all(ns == list(range(SEGMENTS)) for ns in by_flow.values()), "a segment lost or duplicated"
    assert len(by_flow) == FLOWS
    assert all(len(b) == 1 for b in backends.values()), "a flow split over backends"
    assert len(set().union(*backends.values())) == len(BACKENDS)
