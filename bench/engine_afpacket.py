"""Rough forwarding rate of the AF_PACKET engine vs a plain recv()/send() loop, on a veth pair.

    sudo .venv/bin/python bench/engine_afpacket.py [packets] [plain,engine,core]

trafgen (CPU0, peer namespace) offers 84-byte GRE frames at its maximum rate; the forwarder (CPU1, lb
namespace) sends each back out. Forwarded = the peer veth's rx counter (frames go to a MAC nobody has, so
the peer drops them at the Ethernet layer and spends no CPU of ours). Reported: offered and forwarded pps
over the sender's run time, and the forwarder's CPU time per packet. Modes:
- plain: recv()/send() per packet on a plain AF_PACKET socket, each frame through `trivial`;
- engine: the AF_PACKET engine with a trivial block processor (walker.py's seam): the rings alone;
- slow: the same with a 3 us busy wait per frame: is a slower decide() alone enough to lose frames?
- core: the engine as it runs, the real rusty_rail.core Balancer (one catch-all service, one backend).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pyroute2 import netns  # noqa: E402

from rusty_rail.core.maglev import build_table  # noqa: E402
from rusty_rail.core.service import Service, ServiceKey  # noqa: E402
from rusty_rail.dataplane import DataplaneState, EngineOptions  # noqa: E402
from rusty_rail.engines.afpacket.walker import per_frame  # noqa: E402
from tests.engine_netns import VethPair, gre_frame, ipv4, udp  # noqa: E402

NOBODY = bytes.fromhex("020000000001")
RATE = ["-b", os.environ["RATE"]] if os.environ.get("RATE") else []  # e.g. RATE=100kpps: trafgen's pacing


def trivial(frame: bytes) -> bytes:
    return NOBODY + frame[6:]  # one new bytes object, like the real balancer


def trivial_blocks(balancer: Any) -> Any:
    return per_frame(lambda frames, now: [NOBODY + f[6:] for f in frames])


def slow_blocks(balancer: Any) -> Any:
    def process(frames: list[bytes], now: float, pc: Any = time.perf_counter) -> list[bytes]:
        out = []
        for f in frames:
            end = pc() + 3e-6
            while pc() < end:
                pass
            out.append(trivial(f))
        return out
    return per_frame(process)


def plain_loop(dev: str, stop: Any) -> None:
    from rusty_rail.engines.afpacket.cbpf import SO_ATTACH_FILTER, gre_only_filter

    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    prog = gre_only_filter()
    s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog.fprog)
    s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)
    s.bind((dev, 3))
    s.settimeout(0.1)
    recv, send, mono = s.recv, s.send, time.monotonic
    while not stop.is_set():
        try:
            frame = recv(2048)
        except TimeoutError:
            continue
        mono()  # the engine reads the clock per block; this loop's "block" is one frame
        send(trivial(frame))


def forwarder(mode: str, v: VethPair, ready: Any, stop: Any) -> None:
    netns.setns(v.lb_ns)
    os.sched_setaffinity(0, {1})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if mode == "plain":
        ready.set()
        plain_loop(v.lb_dev, stop)
        return
    from rusty_rail.engines.afpacket import AfPacketEngine

    # bench knob: RING="rx_blocks=32,rx_block_tov_ms=2" (PacketRing keyword arguments, integers)
    opts = {k: int(x, 0) for k, x in (kv.split("=") for kv in os.environ.get("RING", "").split(",") if kv)}
    kw: dict[str, Any] = {"ring_options": opts or None}
    if mode != "core":
        kw["processor"] = slow_blocks if mode == "slow" else trivial_blocks
    engine = AfPacketEngine(EngineOptions(v.lb_dev), **kw)
    # core: the real balancer; its backend's "MAC" is a permanent neighbour entry nobody owns
    engine.apply(DataplaneState((Service(ServiceKey.catch_all(), build_table(["10.77.0.50"])),)))
    engine.start()
    ready.set()
    figures = engine.serve(stop).counters.engine
    print(f"  engine stats: rx={figures['rx_packets']} blocks={figures['rx_blocks']} "
          f"ring_drops={figures['rx_kernel_drops']} tx_ring={figures['tx_ring']} spilled={figures['tx_spilled']} "
          f"failed={figures['tx_failed']}", flush=True)


def counter(v: VethPair, ns: str, dev: str, name: str) -> int:
    return int(v.read(ns, f"/sys/class/net/{dev}/statistics/{name}"))


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(mode: str, v: VethPair, cfg: str, packets: int) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=forwarder, args=(mode, v, ready, stop))
    p.start()
    assert ready.wait(20)
    fwd0 = counter(v, v.peer_ns, v.peer_dev, "rx_packets")
    in0 = counter(v, v.lb_ns, v.lb_dev, "rx_packets")
    cpu0 = cpu_seconds(p.pid)
    t0 = time.monotonic()
    subprocess.run(["ip", "netns", "exec", v.peer_ns, "taskset", "-c", "0", "trafgen", "-q", "-o", v.peer_dev,
                    "-i", cfg, "-n", str(packets), "-P", "1", *RATE], check=True, capture_output=True)
    elapsed = time.monotonic() - t0
    # let the forwarder drain what is queued: wait until the forwarded counter stops moving
    last = -1
    while (now := counter(v, v.peer_ns, v.peer_dev, "rx_packets")) != last:
        last = now
        time.sleep(0.2)
    cpu = cpu_seconds(p.pid) - cpu0
    stop.set()
    p.join(10)
    offered = counter(v, v.lb_ns, v.lb_dev, "rx_packets") - in0
    forwarded = last - fwd0
    print(f"{mode:7s} offered {offered / elapsed / 1e3:6.1f} kpps  forwarded {forwarded / elapsed / 1e3:6.1f} kpps "
          f"({forwarded}/{offered}, {100 * forwarded / max(offered, 1):.1f}%)  "
          f"forwarder CPU {1e6 * cpu / max(forwarded, 1):.2f} us/packet", flush=True)


def main() -> None:
    packets = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    v = VethPair()
    try:
        frame = gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, ipv4("10.0.0.1", "10.1.0.1", 17, udp(1234, 80, bytes(18))))
        with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
            f.write("{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n")
        print(f"{len(frame)}-byte GRE frames, {packets} per run")
        v.ip(v.lb_ns, "neigh", "add", "10.77.0.50", "lladdr", NOBODY.hex(":"), "dev", v.lb_dev, "nud", "permanent")
        modes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["plain", "engine", "plain", "engine", "core"]
        for mode in modes:
            run(mode, v, f.name, packets)
        os.unlink(f.name)
    finally:
        v.close()


if __name__ == "__main__":
    main()
