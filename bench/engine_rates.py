"""Delivered/offered of both balancer engines, fed by trafgen with random flows, and CPU per packet.

    sudo .venv/bin/python bench/engine_rates.py [--engines baseline,afpacket,afpacket-decide,xdp]
        [--rounds 1] [--rate 100000] [--seconds-paced 4] [--packets-max 1200000] [--flows random|single]
        [--traffic ipv4,ipv6,ipv6-in-ipv4] [--phases paced,max]
        [--ring rx_blocks=64,...] [--workers N] [--engine-cpus 1] [--profile]   (summary: rates_report.py)

afpacket is the engine as it runs (its block processor: engines/afpacket/bulk.py); afpacket-decide the
same engine with Balancer.decide per frame (walker.decide_blocks), the processor before bulk.py.

Topology (namespaces created here, deleted afterwards, also on failure; nothing on the host's
interfaces): tests.engine_netns.VethPair, one pair per engine so no state leaks between them.

    peer ns: peer0 10.77.0.2   trafgen, pinned to CPU0        lb ns: lb0 10.77.0.1   the engine, CPU1
    backends 10.77.0.101-103: permanent neighbour entries on lb0 with MACs nobody owns, so every forward
    crosses the veth back to peer0 and is dropped there as PACKET_OTHERHOST (cheap, no reply).

Traffic: 84-byte frames, Ethernet | IPv4 (GRE, valid checksum, fixed) | GRE | IPv4 | UDP | 18 bytes.
The inner source address (10.x.y.z) and UDP source port are trafgen drnd() fields: every packet is
(almost surely) a new flow, i.e. the balancer's miss path (hash, Maglev slot, connection insert, LRU
eviction once the table is full). The inner IPv4 checksum is left 0: WIRE.md says it is not checked.
--flows single sends one flow (all connection-table hits) for comparison. --traffic: each engine once
per kind of frame (trafgen_frames.py), on a pair of its own, in this one command: ipv4 (the above), ipv6
(124 bytes, IPv6 UDP from 2001:db8:c::/96 + 4 random bytes in GRE over IPv6, to IPv6 backends
2001:db8:77::101-103, as xdp_test_run.py's IPv6 rows), ipv6-in-ipv4 (104 bytes, to the IPv4 backends);
results keyed "<engine>/<kind>" but for ipv4. IPv6 is off on the pair unless the outer header is IPv6.

Phases per engine, in one engine process (rounds times each): "paced" = trafgen -b RATEpps for
--seconds-paced seconds; "max" = trafgen -t 0 (no gap), --packets-max packets.

The sender and the veth, on this kernel. trafgen's fast path (a TX ring, used without -b/-t) aborts with
"Flushing TX_RING failed: EAGAIN" as soon as lb0 runs XDP and its consumer falls behind: the skbs wait
in lb0's 256-entry XDP ring, that fills the socket's send buffer (about 200 KB; trafgen cannot raise
wmem_max inside a namespace), and trafgen treats EAGAIN as fatal. So both phases use trafgen's
send()-per-packet path. There, a frame the veth refuses (its XDP ring is full; counted as peer0's
tx_dropped, reported here as "refused") comes back to trafgen as ENOBUFS and is sent again: the
sender is slowed to what the receiver takes (backpressure) rather than losing frames at the device.
Hence for XDP, "delivered/offered" only counts frames lost after the device took them; how fast the
engine is shows in delivered kpps, in "refused" (frames the engine could not take when they came) and
in the ratio to the baseline measured the same way. For AF_PACKET, frames are lost silently where it
matters: the kernel's copy into the RX ring drops when the ring is full (tp_drops, "ring_drops").

Counted per phase:
- offered   = packets trafgen reports sent (its "packets outgoing"); lb0's rx counter is also kept.
- delivered = peer0's rx_packets delta after the engine drained (the frames the engine put back on the
  wire; checked against the engine's own forwarded counter). Delivered kpps = delivered / (time from
  the sender's start to the last delivered frame): an engine that falls behind drains its RX ring
  (32 MB by default, ~200k of these frames) after the sender stops; that drain time is "lag", and
  the target check uses both delivered/offered and delivered rate/offered rate.
- Scheduling: --nice (default -20) applies to the sender, the engine process and lb0's NAPI thread;
  sender and engine also get sessions of their own whose autogroup has that nice (see boost_cmd), so
  other load on a shared machine takes less of CPU0/CPU1. --nice 0 measures without any of this.
- CPU per delivered packet:
  * afpacket: the engine process (all its threads, and its forked workers), from schedstat (ns). The kernel's
    copy into the RX ring runs in the sender's softirq on CPU0 (veth has no NAPI without XDP) and is
    not in this figure; the kernel's TX + peer0's receive run on CPU1 inside the engine's sendto()
    and its softirqs, and are in CPU1's /proc/stat figure.
  * xdp / baseline: veth runs XDP in the receiving device's NAPI, which would be the sender's CPU;
    threaded NAPI is switched on for lb0 and its kthread pinned to CPU1, and its schedstat time is the
    figure ("napi"). peer0's own NAPI (XDP_PASS then the drop) is raised from that thread and runs as
    softirq on CPU1; it shows in CPU1's /proc/stat softirq column, reported separately.
  * cpu1: all non-idle time of CPU1 from /proc/stat per delivered packet (includes anything else
    running there; other load on the machine makes it noisy).
- baseline: bpf/xdp_baseline.o (swap MACs, XDP_TX) attached natively like the balancer: the most
  this veth setup forwards, so engine figures are also given as a fraction of it.

Targets (the issues): AF_PACKET >= 99% delivered at the paced rate of random flows (issue 9: at
200 kpps, --rate 200000); XDP >= 98% of what the sender offers at its maximum.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from pyroute2 import netns  # noqa: E402

from bench.procstat import cpu_stat, family, jiffies, napi_threads, task_ns  # noqa: E402
from bench.rates_report import summarise  # noqa: E402
from bench.trafgen_frames import TRAFFIC, frame_bytes, run_trafgen, trafgen_config  # noqa: E402
from tests.engine_netns import VethPair  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = {"10.77.0.101": "02:00:00:00:01:01", "10.77.0.102": "02:00:00:00:01:02", "10.77.0.103": "02:00:00:00:01:03"}
BACKENDS6 = {"2001:db8:77::101": "02:00:00:00:01:01", "2001:db8:77::102": "02:00:00:00:01:02",
             "2001:db8:77::103": "02:00:00:00:01:03"}
SENDER_MAC = bytes.fromhex("020000000099")  # nobody's: the baseline's MAC swap sends frames here
SENDER_CPU, ENGINE_CPU = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
NICE = -20  # main() sets it from --nice: sender, engine process and lb0's NAPI thread
AFPACKET: dict[str, Any] = {}  # main() sets it: the engine's workers (None: its default) and its CPUs


# -- traffic ------------------------------------------------------------------------------------------

def trafgen(v: VethPair, cfg: str, packets: int, rate: int | None) -> tuple[int, float]:
    """trafgen in the peer namespace on CPU0 at NICE; (packets it sent, wall seconds)."""
    return run_trafgen(v, cfg, packets, rate, [*boost_cmd(), "ip", "netns", "exec", v.peer_ns, "nice", "-n", str(NICE),
                                               "taskset", "-c", str(SENDER_CPU)], new_session=NICE < 0)


def boost_cmd() -> list[str]:
    """A command prefix giving the command's (new) session's autogroup the nice value NICE: with
    autogroup scheduling (kernel.sched_autogroup_enabled=1) a task's own nice counts only inside its
    session's group, so a nice -20 process still gets no more than any other session's busy process."""
    if NICE >= 0:
        return []
    return ["sh", "-c", f'echo {NICE} > /proc/self/autogroup 2>/dev/null; exec "$@"', "sh"]


def boost_self() -> None:
    """The same for this (forked) process: a session of its own, and its autogroup's nice."""
    if NICE >= 0:
        return
    os.setpriority(os.PRIO_PROCESS, 0, NICE)
    try:
        os.setsid()
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(NICE))
    except OSError:
        pass

# -- the engine process -------------------------------------------------------------------------------

def engine_child(kind: str, v: VethPair, conn: Any, ring: dict[str, int] | None, profile: str | None,
                 backends: list[str]) -> None:
    """Runs in the lb namespace on CPU1. Commands over `conn`: "counters" -> dict, "stop" -> final dict."""
    try:
        netns.setns(v.lb_ns)
        os.sched_setaffinity(0, AFPACKET.get("cpus", {ENGINE_CPU}))
        boost_self()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop = threading.Event()
        final: dict[str, Any] = {}
        errors: list[str] = []

        if kind.startswith("afpacket") or kind == "xdp":
            from rusty_rail.core.maglev import build_table
            from rusty_rail.core.service import Service, ServiceKey
            from rusty_rail.dataplane import DataplaneState, EngineOptions
            from rusty_rail.engines.afpacket import AfPacketEngine
            from rusty_rail.engines.afpacket.bulk import bulk_blocks
            from rusty_rail.engines.afpacket.walker import decide_blocks
            from rusty_rail.engines.xdp import XdpEngine

            # Every engine through the one Engine protocol, as the daemon drives them.
            if kind == "xdp":
                dataplane: Any = XdpEngine(EngineOptions(v.lb_dev))
            else:
                workers = {"workers": AFPACKET["workers"]} if AFPACKET.get("workers") else {}
                dataplane = AfPacketEngine(EngineOptions(v.lb_dev, **workers), ring_options=ring,
                                           processor=decide_blocks if kind == "afpacket-decide" else bulk_blocks)
            dataplane.apply(DataplaneState((Service(ServiceKey.catch_all(), build_table(backends)),)))
            engine: Any = type("E", (), {"ready": threading.Event()})()  # the same handle as the baseline's

            def counters() -> dict[str, int]:
                c = dataplane.counters()
                return {"forwarded": c.forwarded, "passed": c.passed, "connections": c.connections,
                        "connection_evictions": c.connection_evictions,
                        **{f"drop_{k}": n for k, n in c.drops.items()}, **c.engine}

            def serve() -> None:
                prof = None
                if profile:
                    import cProfile

                    prof = cProfile.Profile()
                    prof.enable()
                dataplane.start()
                engine.ready.set()
                try:
                    report = dataplane.serve(stop)
                finally:
                    dataplane.close()
                if prof is not None:
                    prof.disable()
                    prof.dump_stats(profile)
                final.update(report.counters.engine)
        elif kind == "baseline":
            from rusty_rail.bpf import libbpf

            obj = libbpf.BpfObject(str(ROOT / "src" / "rusty_rail" / "bpf" / "xdp_baseline.o"))
            obj.load()
            import socket

            ifindex = socket.if_nametoindex(v.lb_dev)
            engine = type("E", (), {"ready": threading.Event()})()
            counters = dict

            def serve() -> None:
                libbpf.xdp_attach(ifindex, obj.program("rr_baseline").fd, libbpf.XDP_FLAGS_DRV_MODE)
                try:
                    engine.ready.set()
                    stop.wait()
                finally:
                    libbpf.xdp_detach(ifindex, libbpf.XDP_FLAGS_DRV_MODE)
                    obj.close()
        else:
            raise ValueError(kind)

        def guarded() -> None:
            try:
                serve()
            except BaseException:
                errors.append(traceback.format_exc())
                engine.ready.set()

        t = threading.Thread(target=guarded, name=f"engine-{kind}")
        t.start()
        if not engine.ready.wait(30) or errors:
            conn.send(("error", errors[0] if errors else "engine not ready in 30 s"))
            stop.set()
            t.join(10)
            return
        conn.send(("ready", None))
        while True:
            cmd = conn.recv()
            if cmd == "counters":
                conn.send(("counters", dict(counters())))
            elif cmd == "stop":
                last = dict(counters())
                stop.set()
                t.join(30)
                conn.send(("stopped", {"counters": last, "engine": final, "errors": errors}))
                return
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:
            pass


class Engine:
    """The parent's handle on one engine process."""

    def __init__(self, kind: str, v: VethPair, ring: dict[str, int] | None, profile: str | None,
                 backends: list[str]) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        # Not a daemon: the AF_PACKET engine forks its workers from it (kill() ends it on every path out).
        self.proc = ctx.Process(target=engine_child, args=(kind, v, child, ring, profile, backends))
        self.proc.start()
        if not self.conn.poll(40):
            self.kill()
            raise RuntimeError(f"{kind}: engine did not start")
        what, detail = self.conn.recv()
        if what != "ready":
            self.kill()
            raise RuntimeError(f"{kind}: engine failed to start:\n{detail}")

    def ask(self, cmd: str) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(60):
            raise RuntimeError(f"engine did not answer {cmd!r}")
        what, detail = self.conn.recv()
        if what == "error":
            raise RuntimeError(detail)
        return detail

    def stop(self) -> dict[str, Any]:
        try:
            return self.ask("stop")
        finally:
            self.proc.join(10)
            self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# -- measurements ------------------------------------------------------------------------------------

def threaded_napi(v: VethPair) -> list[int]:
    """Switch lb0 to threaded NAPI (XDP must be attached) and pin its kthread(s) to the engine's CPU."""
    before = napi_threads(v.lb_dev)
    v.run(v.lb_ns, "sh", "-c", f"echo 1 > /sys/class/net/{v.lb_dev}/threaded")
    deadline = time.monotonic() + 5
    while not (new := napi_threads(v.lb_dev) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not new:
        raise RuntimeError(f"no new napi/{v.lb_dev}-* kthread after enabling threaded NAPI")
    for pid in new:
        os.sched_setaffinity(pid, {ENGINE_CPU})
        os.setpriority(os.PRIO_PROCESS, pid, NICE)
    return sorted(new)


def quiet(v: VethPair, still_s: float = 1.5, timeout: float = 15.0) -> None:
    """Until neither device has received anything for still_s: a pair with IPv6 on says its own piece
    after coming up (DAD, MLD reports: a few frames), which must not be counted as delivered."""
    def received() -> tuple[int, int]:
        return counter(v, v.lb_ns, v.lb_dev, "rx_packets"), counter(v, v.peer_ns, v.peer_dev, "rx_packets")
    last, since, deadline = received(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < still_s:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pair never went quiet for {still_s} s ({timeout} s)")
        time.sleep(0.1)  # sampling counters, bounded by the deadline
        if (now := received()) != last:
            last, since = now, time.monotonic()


def counter(v: VethPair, ns: str, dev: str, name: str) -> int:
    return int(v.read(ns, f"/sys/class/net/{dev}/statistics/{name}"))


def snapshot(v: VethPair, engine: Engine, cpu_pids: list[int]) -> dict[str, Any]:
    return {
        "peer_rx": counter(v, v.peer_ns, v.peer_dev, "rx_packets"),
        "lb_rx": counter(v, v.lb_ns, v.lb_dev, "rx_packets"),
        "lb_rx_dropped": counter(v, v.lb_ns, v.lb_dev, "rx_dropped"),
        "peer_tx_dropped": counter(v, v.peer_ns, v.peer_dev, "tx_dropped"),
        "task_ns": sum(task_ns(p) for pid in cpu_pids for p in family(pid)),
        "cpu1": cpu_stat(ENGINE_CPU),
        "engine": engine.ask("counters"),
    }


def phase(v: VethPair, engine: Engine, cpu_pids: list[int], cfg: str, packets: int, rate: int | None) -> dict[str, Any]:
    a = snapshot(v, engine, cpu_pids)
    j0 = jiffies(engine.proc.pid)
    t0 = time.monotonic()
    sent, elapsed = trafgen(v, cfg, packets, rate)
    t_end = time.monotonic()
    # Drained: the peer's counter has not moved for 0.3 s. The time of its last change ends the run,
    # so a forwarder that lags (frames queued in its RX ring) is measured at the rate it really keeps.
    last, t_last = counter(v, v.peer_ns, v.peer_dev, "rx_packets"), time.monotonic()
    while time.monotonic() - t_last < 0.3:
        time.sleep(0.05)
        now = counter(v, v.peer_ns, v.peer_dev, "rx_packets")
        if now != last:
            last, t_last = now, time.monotonic()
    b = snapshot(v, engine, cpu_pids)
    j1 = jiffies(engine.proc.pid)
    delivered = b["peer_rx"] - a["peer_rx"]
    span = max(t_last - t0, elapsed)
    d_cpu = {k: (b["cpu1"][k] - a["cpu1"][k]) * 1e6 / CLK_TCK for k in a["cpu1"]}  # microseconds
    eng = {k: b["engine"][k] - a["engine"].get(k, 0) for k in b["engine"] if isinstance(b["engine"][k], int)}
    per = max(delivered, 1)
    return {
        "offered": sent, "seconds": elapsed, "delivered": delivered,
        "offered_kpps": sent / elapsed / 1e3, "delivered_kpps": delivered / span / 1e3,
        "lag_s": max(0.0, t_last - t_end),
        "ratio": delivered / max(sent, 1),
        "lb_rx": b["lb_rx"] - a["lb_rx"], "lb_rx_dropped": b["lb_rx_dropped"] - a["lb_rx_dropped"],
        "refused": b["peer_tx_dropped"] - a["peer_tx_dropped"],
        "engine_forwarded": eng.get("forwarded"),
        "engine_counters": {k: x for k, x in eng.items() if x},
        "engine_us_per_pkt": (b["task_ns"] - a["task_ns"]) / 1e3 / per,
        "engine_process_user_us_per_pkt": (j1[0] - j0[0]) * 1e6 / CLK_TCK / per,
        "engine_process_sys_us_per_pkt": (j1[1] - j0[1]) * 1e6 / CLK_TCK / per,
        "engine_process_faults_per_pkt": (j1[2] - j0[2] + j1[3] - j0[3]) / per,
        "cpu1_us_per_pkt": d_cpu["busy"] / per,
        "cpu1_softirq_us_per_pkt": d_cpu["softirq"] / per,
        "cpu1_steal_fraction": d_cpu["steal"] / max(1.0, sum(d_cpu[k] for k in ("busy", "idle"))),
        "cpu1_busy_fraction": d_cpu["busy"] / max(1.0, sum(d_cpu[k] for k in ("busy", "idle"))),
    }


def run_engine(kind: str, args: argparse.Namespace, ring: dict[str, int] | None, traffic: str = "ipv4") -> dict[str, Any]:
    v = VethPair()
    engine = None
    six = TRAFFIC[traffic][1] == "ipv6"  # the outer family, and so the backends'
    backends = BACKENDS6 if six else BACKENDS
    try:
        for ns, dev in ((v.lb_ns, v.lb_dev), (v.peer_ns, v.peer_dev)):
            if six:  # IPv6 on, but nothing of its own to say: no router solicitations in the counters
                v.run(ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.router_solicitations=0", check=False)
            else:  # no IPv6 chatter (ND, MLD) in the counters
                v.run(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
                      check=False)
        if six:
            v.add_ipv6()
            quiet(v)
        for b, mac in backends.items():
            v.ip(v.lb_ns, "neigh", "replace", b, "lladdr", mac, "dev", v.lb_dev, "nud", "permanent")
        if kind in ("xdp", "baseline"):
            from rusty_rail.engines.xdp import attach_pass

            attach_pass(v.peer_dev, netns=v.peer_ns)  # XDP_TX on a veth delivers only to a peer running XDP
        with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
            f.write(trafgen_config(v, args.flows, SENDER_MAC, traffic))
        profile = str(RESULTS / f"engine_rates-{kind}.prof") if args.profile and kind.startswith("afpacket") else None
        engine = Engine(kind, v, ring, profile, list(backends))
        cpu_pids = threaded_napi(v) if kind in ("xdp", "baseline") else [engine.proc.pid]
        phases: dict[str, list[dict[str, Any]]] = {"paced": [], "max": []}
        wanted = args.phases.split(",")
        for _ in range(args.rounds):
            if kind != "baseline" and "paced" in wanted:
                phases["paced"].append(phase(v, engine, cpu_pids, f.name, int(args.rate * args.seconds_paced), args.rate))
            if "max" in wanted:
                phases["max"].append(phase(v, engine, cpu_pids, f.name, args.packets_max, None))
        final = engine.stop()
        engine = None
        os.unlink(f.name)
        return {"phases": phases, "final": final, "traffic": traffic, "frame_bytes": frame_bytes(traffic),
                "cpu_pids": "engine process" if kind.startswith("afpacket") else "napi kthread"}
    finally:
        if engine is not None:
            engine.kill()
        v.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", default="baseline,afpacket,xdp")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--rate", type=int, default=100_000, help="paced phase, packets per second")
    p.add_argument("--seconds-paced", type=float, default=8.0)
    p.add_argument("--packets-max", type=int, default=1_200_000)
    p.add_argument("--flows", choices=("random", "single"), default="random")
    p.add_argument("--traffic", default="ipv4", help=f"kinds of frames, each engine once per kind: {', '.join(TRAFFIC)}")
    p.add_argument("--phases", default="paced,max", help="paced, max or both")
    p.add_argument("--ring", default=os.environ.get("RING", ""), help="AF_PACKET PacketRing options, k=v,...")
    p.add_argument("--nice", type=int, default=-20,
                   help="nice value of sender, engine and NAPI thread (-20: as close to a dedicated core as "
                        "a shared machine allows; 0: plain)")
    p.add_argument("--workers", type=int, default=None, help="AF_PACKET workers (default: the engine's)")
    p.add_argument("--engine-cpus", default=str(ENGINE_CPU), help="CPUs of the engine process and its workers")
    p.add_argument("--profile", action="store_true", help="cProfile the AF_PACKET engine (bench/results/*.prof)")
    args = p.parse_args(argv)
    kinds = args.traffic.split(",")
    if set(kinds) - set(TRAFFIC) or set(args.phases.split(",")) - {"paced", "max"}:
        p.error(f"--traffic takes {', '.join(TRAFFIC)}; --phases takes paced, max")
    if os.geteuid() != 0:
        print("engine_rates: needs root (namespaces, XDP)", file=sys.stderr)
        return 2
    if os.cpu_count() is None or os.cpu_count() < 2:
        print("engine_rates: needs 2 CPUs", file=sys.stderr)
        return 2
    global NICE
    NICE = args.nice
    AFPACKET.update(workers=args.workers, cpus={int(c) for c in args.engine_cpus.split(",")})
    ring = {k: int(x, 0) for k, x in (kv.split("=") for kv in args.ring.split(",") if kv)} or None
    RESULTS.mkdir(exist_ok=True)
    load0 = os.getloadavg()
    results: dict[str, Any] = {}
    print(f"engine_rates: {', '.join(f'{t} ({frame_bytes(t)}-byte frames)' for t in kinds)}, {args.flows} flows, "
          f"paced {args.rate / 1e3:.0f} kpps x "
          f"{args.seconds_paced:g} s, max {args.packets_max:,} packets, {args.rounds} round(s), nice {args.nice}; "
          f"load {load0[0]:.2f}",
          flush=True)
    for engine_kind, traffic in ((e, t) for e in args.engines.split(",") for t in kinds):
        kind = engine_kind if traffic == "ipv4" else f"{engine_kind}/{traffic}"
        t0 = time.monotonic()
        results[kind] = run_engine(engine_kind, args, ring, traffic)
        for name, rows in results[kind]["phases"].items():
            for r in rows:
                print(f"  {kind:8} {name:5} offered {r['offered_kpps']:6.1f} kpps delivered {r['delivered_kpps']:6.1f} kpps "
                      f"({r['ratio']:.2%}) engine {r['engine_us_per_pkt']:.2f} us/pkt cpu1 {r['cpu1_us_per_pkt']:.2f} "
                      f"us/pkt (softirq {r['cpu1_softirq_us_per_pkt']:.2f}) user/sys {r['engine_process_user_us_per_pkt']:.2f}/"
                      f"{r['engine_process_sys_us_per_pkt']:.2f} faults/pkt {r['engine_process_faults_per_pkt']:.3f} lag {r['lag_s']:.2f} s fwd={r['engine_forwarded']} refused={r['refused']} "
                      f"lb_rx={r['lb_rx']} {r['engine_counters']}", flush=True)
        if results[kind]["final"].get("engine"):
            e = results[kind]["final"]["engine"]
            print(f"  {kind:8} engine stats: ring_drops={e.get('rx_kernel_drops')} spilled={e.get('tx_spilled')} "
                  f"failed={e.get('tx_failed')} blocks={e.get('rx_blocks')} rx={e.get('rx_packets')} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
    lines = summarise(results)
    print("\n".join(lines))
    if args.profile and "afpacket" in args.engines:
        import pstats

        path = RESULTS / "engine_rates-afpacket.prof"
        if path.exists():
            pstats.Stats(str(path)).sort_stats("tottime").print_stats(18)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {
        "bench": "engine_rates", "time": stamp, "kernel": platform.release(),
        "frame_bytes": {t: frame_bytes(t) for t in kinds}, "traffic": kinds, "phases": args.phases.split(","),
        "flows": args.flows, "rate_pps": args.rate, "seconds_paced": args.seconds_paced,
        "packets_max": args.packets_max, "rounds": args.rounds, "nice": args.nice, "ring": ring, "loadavg": [load0, os.getloadavg()],
        "backends": {**BACKENDS, **BACKENDS6}, "results": results, "summary": lines,
    }
    path = RESULTS / f"engine_rates-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
