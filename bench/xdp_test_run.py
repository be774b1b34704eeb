"""Per-packet cost of the XDP balancer through BPF_PROG_TEST_RUN, against a baseline XDP program.

    sudo .venv/bin/python bench/xdp_test_run.py [repeat=1000000] [rounds=5]

Programs (same process, same CPU, same 84-byte frame: Ethernet | IPv4 | GRE | IPv4 | UDP | 18 bytes):
- baseline: bpf/xdp_baseline.o, swaps the Ethernet addresses and returns XDP_TX (the least a
  forwarder does; includes BPF_PROG_TEST_RUN's own per-repetition cost).
- hit:  the balancer with the flow's connection entry present (M = 65537, 3 backends), serving the
  environment form: one catch-all service, found without a map lookup. After a flow's first packet in
  a tick, a CPU's hits come from its flow cache (bpf/rr_flow_cache.h), as every repetition here does;
  "hit in rr_conns" is the first packet's path: the cache turned off (XdpProgram.use_flow_cache).
- miss: the balancer taking the table path every time (hash, Maglev slot, backend, LRU write).
- hit, named service: the same flow's service given by its VIP, port and protocol: its connection entry
  names the service (stamped under rr_config.services_gen), so a hit skips the rr_services lookup.
- the per-service options (docs/WIRE.md section 11), each on the named service alone, the same flow:
  hash = "source-ip" (a hit: the connection table is read as usual), connection_table = false (every
  packet by its slot: a hash, the slot, no table), quic = true with the payload a QUIC short header
  naming a backend's server ID (no table either). "hit" above is the default options (answer_ping on,
  which costs a UDP flow nothing). An echo answer is not measured here: its output is plain IP, which
  the next repetition would pass.
- IPv6 hit / miss (expired): the same measurements for an IPv6 flow: a 124-byte frame, Ethernet | IPv6 |
  GRE | IPv6 | UDP | 18 bytes, to IPv6 backends (rr_conns6, the outer IPv6 header, the flow label from
  the entry). Its output has the same length and flow, so every repetition after the first is a hit.

How the miss is measured, honestly. With repeat > 1 the kernel does not restore the frame between
repetitions, so every repetition after the first sees the previous output — the same inner flow, so
an ordinary run is all hits after the first. Two measurements are reported:
1. "miss (expired)", repeat = N: the idle timeouts are set to 0, so the entry found is always stale
   and the program does the table's work (hash, rr_maglev, rr_backends). The entry names the backend
   the table gives, so it is restamped in place (what an update would leave, without one): this is
   a flow that comes back after its timeout, not a new flow. The counters confirm every repetition
   took the table path (conn_new).
2. "miss (deleted)", repeat = 1, R times: a new flow, inserted into rr_conns (a map update: a new
   element from the LRU's free list). The entry is deleted (a separate syscall, outside the timed
   region) before each run; the kernel's reported duration covers only the run, but at
   repeat = 1 it includes the timer's own overhead, so it is compared with the hit and the baseline
   measured the same way (repeat = 1, R times), and the miss - hit difference is what is reported.
Figures: median over `rounds` of the kernel's average ns per repetition. The hit paths (IPv4, IPv6, the
named service) and the options are also measured paired: baseline and case run back to back in each
round, and the median of the rounds' ratios is reported, which other load on the machine moves far less
than a ratio of medians taken seconds apart.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dataclasses import replace  # noqa: E402
from ipaddress import IPv4Address, IPv6Address  # noqa: E402

from rusty_rail.bpf import libbpf  # noqa: E402
from rusty_rail.core.balancer import Balancer  # noqa: E402
from rusty_rail.core.conntrack import Timeouts  # noqa: E402
from rusty_rail.core.constants import DEFAULT_TABLE_SIZE  # noqa: E402
from rusty_rail.core.maglev import build_table  # noqa: E402
from rusty_rail.core.options import HashFields, ServiceOptions  # noqa: E402
from rusty_rail.core.service import Service, ServiceKey, ServiceProtocol  # noqa: E402
from rusty_rail.engines.xdp import XdpAction, XdpProgram, counters  # noqa: E402
from rusty_rail.engines.xdp.planner import Desired  # noqa: E402

BPF_DIR = Path(__file__).resolve().parent.parent / "src" / "rusty_rail" / "bpf"
RESULTS = Path(__file__).resolve().parent / "results"
LB_ADDRESS, LB_MAC = "192.168.137.11", bytes.fromhex("020000000011")
LB_ADDRESS6 = "2001:db8:137::11"
BACKENDS = {"10.2.0.1": "020000000201", "10.2.0.2": "020000000202", "10.2.0.3": "020000000203"}
BACKENDS6 = {"2001:db8:2::1": "020000000601", "2001:db8:2::2": "020000000602", "2001:db8:2::3": "020000000603"}


def _csum(data: bytes) -> int:
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ipv4(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    h = bytes([0x45, 0]) + (20 + len(payload)).to_bytes(2, "big") + b"\0\0\x40\x00" + bytes([64, proto]) + b"\0\0" + src + dst
    return h[:10] + _csum(h).to_bytes(2, "big") + h[12:] + payload


def frame(payload: bytes = b"x" * 18) -> bytes:
    """84 bytes (an 18-byte payload), no padding and no GRE options: the output has the same length and
    inner flow."""
    udp = (40000).to_bytes(2, "big") + (53).to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    inner = _ipv4(bytes([10, 0, 0, 1]), bytes([10, 1, 0, 1]), 17, udp)
    outer = _ipv4(bytes([192, 168, 137, 1]), bytes([192, 168, 137, 11]), 47, b"\x00\x00\x08\x00" + inner)
    return LB_MAC + bytes.fromhex("020000000001") + b"\x08\x00" + outer


def _ipv6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    return (b"\x60\x00\x00\x00" + len(payload).to_bytes(2, "big") + bytes([nh, 64]) + IPv6Address(src).packed
            + IPv6Address(dst).packed + payload)


def frame6() -> bytes:
    """124 bytes: GRE over IPv6 carrying IPv6 UDP; the output has the same length and inner flow."""
    udp = (40000).to_bytes(2, "big") + (53).to_bytes(2, "big") + (26).to_bytes(2, "big") + b"\0\0" + b"x" * 18
    inner = _ipv6("2001:db8:c::1", "2001:db8:1::1", 17, udp)
    return LB_MAC + bytes.fromhex("020000000001") + b"\x86\xdd" + _ipv6("2001:db8:137::1", LB_ADDRESS6, 47,
                                                                        b"\x00\x00\x86\xdd" + inner)


def median_ns(run, rounds: int) -> float:
    return statistics.median(run() for _ in range(rounds))


def paired_ratio(baseline, case, rounds: int) -> float:
    """Median over rounds of case / baseline, the two run back to back in each round."""
    return statistics.median(case() / baseline() for _ in range(rounds))


def main() -> int:
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    singles = 20_000  # repeat=1 runs per round for the deleted-entry miss
    if repeat < 1_000_000:
        print(f"note: repeat {repeat} < 1,000,000 (fine for a smoke run, not for figures)")
    try:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one CPU: per-CPU maps, steady caches
    except OSError:
        pass
    pkt = frame()
    table = build_table(list(BACKENDS), DEFAULT_TABLE_SIZE)
    reference = Balancer(LB_ADDRESS, LB_MAC, [Service(ServiceKey.catch_all(), table)])
    for b, mac in BACKENDS.items():
        reference.set_neighbour(b, bytes.fromhex(mac))
    desired = Desired.mirror(reference)

    with libbpf.BpfObject(str(BPF_DIR / "xdp_baseline.o")) as base_obj, XdpProgram(conn_capacity=65536) as x:
        base_obj.load()
        base_fd = base_obj.program("rr_baseline").fd
        x.sync(desired)
        action, out = x.test_run(pkt)
        assert action == XdpAction.TX and out == reference.decide(pkt, now=0.0).frame, "program disagrees with core"
        conn_key = next(iter(x.connections())).key

        def timed(fd: int, r: int) -> float:
            retval, _, duration = libbpf.prog_test_run(fd, pkt, repeat=r)
            assert retval == XdpAction.TX, retval
            return float(duration)

        results: dict[str, float] = {}
        checks: dict[str, dict[str, int]] = {}
        results["baseline"] = median_ns(lambda: timed(base_fd, repeat), rounds)

        counters.reset(x)
        results["hit"] = median_ns(lambda: timed(x.prog_fd, repeat), rounds)
        checks["hit"] = {k: v for k, v in counters.named(x).items() if v}
        paired = {"hit": paired_ratio(lambda: timed(base_fd, repeat), lambda: timed(x.prog_fd, repeat), rounds)}

        # Miss, method 1: every entry is stale (idle timeouts 0), repeat = N.
        x.sync(replace(desired, timeouts=Timeouts(0.0, 0.0, 0.0)))
        counters.reset(x)
        results["miss_expired"] = median_ns(lambda: timed(x.prog_fd, repeat), rounds)
        checks["miss_expired"] = {k: v for k, v in counters.named(x).items() if v}
        x.sync(desired)

        # A hit without the CPU's flow cache: the entry looked up in rr_conns, as a flow's first
        # packet in a tick is.
        x.use_flow_cache(False)
        counters.reset(x)
        results["hit_conns"] = median_ns(lambda: timed(x.prog_fd, repeat), rounds)
        checks["hit_conns"] = {k: v for k, v in counters.named(x).items() if v}
        paired["hit_conns"] = paired_ratio(lambda: timed(base_fd, repeat), lambda: timed(x.prog_fd, repeat), rounds)
        x.use_flow_cache(True)

        # Miss, method 2: repeat = 1, entry deleted before each run; hit and baseline measured alike.
        def singles_avg(fd: int, delete: bool) -> float:
            total = 0
            for _ in range(singles):
                if delete:
                    x.delete_connection(conn_key)  # its own syscall, outside the timed run
                retval, _, duration = libbpf.prog_test_run(fd, pkt, repeat=1)
                total += duration
            return total / singles

        counters.reset(x)
        results["baseline_r1"] = median_ns(lambda: singles_avg(base_fd, False), rounds)
        results["hit_r1"] = median_ns(lambda: singles_avg(x.prog_fd, False), rounds)
        results["miss_deleted_r1"] = median_ns(lambda: singles_avg(x.prog_fd, True), rounds)
        checks["r1_runs"] = {k: v for k, v in counters.named(x).items() if v}
        # The miss's extra cost at repeat=1, added to the hit at repeat=N: comparable with the rest.
        results["miss_deleted"] = results["hit"] + results["miss_deleted_r1"] - results["hit_r1"]

        # Hit, the flow's service named by VIP, port and protocol (same table, same backends).
        named = Service(ServiceKey(IPv4Address("10.1.0.1"), ServiceProtocol.UDP, 53), table)
        x.sync(replace(desired, state=replace(desired.state, services=(named,))))
        counters.reset(x)
        results["hit_named"] = median_ns(lambda: timed(x.prog_fd, repeat), rounds)
        checks["hit_named"] = {k: v for k, v in counters.named(x).items() if v}
        paired["hit_named"] = paired_ratio(lambda: timed(base_fd, repeat), lambda: timed(x.prog_fd, repeat), rounds)

        # The options, each on that named service (its flow is the same; the table path where the
        # option skips the connection table).
        server_ids = tuple((int(IPv4Address(b)), i + 1) for i, b in enumerate(sorted(BACKENDS)))
        quic_pkt = frame(b"\x40\x00\x00\x02" + bytes(14))  # short header, rotation 0, server ID 2
        for name, options, packet in (
                ("hit_source_ip", ServiceOptions(hash=HashFields.SOURCE_IP), pkt),
                ("no_conn_table", ServiceOptions(connection_table=False), pkt),
                ("quic_server_id", ServiceOptions(quic=True, server_ids=server_ids), quic_pkt)):
            x.sync(replace(desired, state=replace(desired.state, services=(replace(named, options=options),))))
            counters.reset(x)

            def timed_case(r: int, packet: bytes = packet) -> float:
                retval, _, duration = libbpf.prog_test_run(x.prog_fd, packet, repeat=r)
                assert retval == XdpAction.TX, retval
                return float(duration)

            results[name] = median_ns(lambda: timed_case(repeat), rounds)
            checks[name] = {k: v for k, v in counters.named(x).items() if v}
            paired[name] = paired_ratio(lambda: timed(base_fd, repeat), lambda: timed_case(repeat), rounds)

        # An IPv6 flow in GRE over IPv6 to IPv6 backends: hit, then every entry stale (the miss).
        pkt6 = frame6()
        reference6 = Balancer(LB_ADDRESS, LB_MAC, [Service(ServiceKey.catch_all(), build_table(list(BACKENDS6)))],
                              local_address6=LB_ADDRESS6)
        for b, mac in BACKENDS6.items():
            reference6.set_neighbour(b, bytes.fromhex(mac))
        desired6 = Desired.mirror(reference6)
        x.sync(desired6)
        action, out = x.test_run(pkt6)
        assert action == XdpAction.TX and out == reference6.decide(pkt6, now=0.0).frame, "program disagrees (IPv6)"

        def timed6(r: int) -> float:
            retval, _, duration = libbpf.prog_test_run(x.prog_fd, pkt6, repeat=r)
            assert retval == XdpAction.TX, retval
            return float(duration)

        counters.reset(x)
        results["hit_v6"] = median_ns(lambda: timed6(repeat), rounds)
        checks["hit_v6"] = {k: v for k, v in counters.named(x).items() if v}
        paired["hit_v6"] = paired_ratio(lambda: timed(base_fd, repeat), lambda: timed6(repeat), rounds)
        x.sync(replace(desired6, timeouts=Timeouts(0.0, 0.0, 0.0)))
        counters.reset(x)
        results["miss_expired_v6"] = median_ns(lambda: timed6(repeat), rounds)
        checks["miss_expired_v6"] = {k: v for k, v in counters.named(x).items() if v}

    base = results["baseline"]
    rows = [
        ("baseline (swap MACs, XDP_TX)", "baseline", f"repeat={repeat:,}"),
        ("balancer, connection HIT", "hit", f"repeat={repeat:,}"),
        ("HIT in rr_conns, flow cache off", "hit_conns", f"repeat={repeat:,}"),
        ("balancer, HIT, named service", "hit_named", f"repeat={repeat:,}"),
        ("MISS, expired entry restamped", "miss_expired", f"repeat={repeat:,}"),
        ("HIT, hash = source-ip", "hit_source_ip", f"repeat={repeat:,}"),
        ("connection_table = false", "no_conn_table", f"repeat={repeat:,}"),
        ("quic = true, server ID", "quic_server_id", f"repeat={repeat:,}"),
        ("balancer, IPv6 HIT (v6 in v6)", "hit_v6", f"repeat={repeat:,}"),
        ("IPv6 MISS, expired, restamped", "miss_expired_v6", f"repeat={repeat:,}"),
        ("MISS, new flow (entry deleted)", "miss_deleted", "hit + (miss_r1 - hit_r1)"),
        ("baseline, repeat=1", "baseline_r1", f"{singles:,} runs"),
        ("balancer HIT, repeat=1", "hit_r1", f"{singles:,} runs"),
        ("balancer MISS deleted, repeat=1", "miss_deleted_r1", f"{singles:,} runs"),
    ]
    print(f"{'case':34} {'ns/pkt':>8} {'x base':>7}  how")
    for label, name, how in rows:
        ref = results["baseline_r1"] if name.endswith("_r1") else base
        print(f"{label:34} {results[name]:8.1f} {results[name] / ref:7.2f}  {how}")
    print("paired (baseline and case back to back each round, median of ratios): "
          + ", ".join(f"{k} {v:.2f}" for k, v in paired.items()))
    print(f"counters: {checks}")

    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {
        "bench": "xdp_test_run", "time": stamp, "kernel": platform.release(), "cpu": platform.processor(),
        "frame_bytes": len(pkt), "frame6_bytes": len(frame6()), "repeat": repeat, "rounds": rounds, "singles": singles,
        "ns_per_packet": results, "ratio_to_baseline": {k: results[k] / (results["baseline_r1"] if k.endswith("_r1") else base) for k in results},
        "paired_ratio_to_baseline": paired, "counters": checks,
    }
    path = RESULTS / f"xdp_test_run-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
