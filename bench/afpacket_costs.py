"""Where the AF_PACKET engine's per-packet time goes: the Balancer's decide() and its parts, timed in
this process without any I/O (no namespaces, no root needed).

    .venv/bin/python bench/afpacket_costs.py [packets=200000]

Cases (84-byte GRE frames, 3 backends, M = 65537, same frame layout as engine_rates.py):
- decide, one flow: every packet a connection-table hit.
- decide, random flows, table empty: every packet a miss + insert (table grows).
- decide, random flows, table full: miss + insert + LRU eviction (the steady state of random traffic
  once the table has seen `capacity` flows; a small capacity is used to get there quickly).
- the parts of the miss path, each alone: flow_hash, inner_flow_key, ConnectionTable.lookup (absent),
  insert (new key, with eviction), the outer checksum, slicing the frame, Forward's output bytes.
- the ring walker's per-frame work (engines/afpacket/walker.py) on a ring laid out in anonymous memory
  (tests/memory_ring.py), calls of 64, 256 and 512 frames, with each block processor: decide_blocks
  (Balancer.decide per frame) and bulk (the engine's: engines/afpacket/bulk.py): reading the block's
  frame headers, the processor, and writing the forwards into the TX ring (the kick, a syscall, left
  out).
Figures: median of 5 runs, nanoseconds of this thread's CPU time per packet (robust to other load). What
the kernel adds (the kick's transmit, the copy into the RX ring) is engine_rates.py's "engine us/pkt"
minus these.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from rusty_rail.core.balancer import Balancer  # noqa: E402
from rusty_rail.core.checksum import ones_complement_sum  # noqa: E402
from rusty_rail.core.conntrack import ConnectionTable  # noqa: E402
from rusty_rail.core.flow import inner_flow_key  # noqa: E402
from rusty_rail.core.flowhash import flow_hash  # noqa: E402
from rusty_rail.core.maglev import build_table  # noqa: E402
from rusty_rail.core.service import Service, ServiceKey  # noqa: E402
from rusty_rail.engines.afpacket.bulk import bulk_blocks  # noqa: E402
from rusty_rail.engines.afpacket.walker import ProcessorFactory, RingWalker, decide_blocks  # noqa: E402
from tests.engine_netns import gre_frame, ipv4, udp  # noqa: E402
from tests.memory_ring import MemoryRing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LB_IP, LB_MAC, PEER_IP, PEER_MAC = "10.77.0.1", bytes.fromhex("020000000011"), "10.77.0.2", bytes.fromhex("020000000099")
BACKENDS = {"10.77.0.101": "020000000101", "10.77.0.102": "020000000102", "10.77.0.103": "020000000103"}


def frames(n: int, rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(n):
        src = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
        out.append(gre_frame(LB_MAC, PEER_MAC, PEER_IP, LB_IP, ipv4(src, "10.1.0.1", 17, udp(rng.randrange(65536), 80, bytes(18)))))
    return out


def balancer(capacity: int = 1 << 20) -> Balancer:
    service = Service(ServiceKey.catch_all(), build_table(list(BACKENDS)))
    b = Balancer(LB_IP, LB_MAC, (service,), connections=ConnectionTable(capacity))
    for ip, mac in BACKENDS.items():
        b.set_neighbour(ip, bytes.fromhex(mac))
    return b


BLOCKS = (64, 256, 512)
"""Frames per call: what a 2 ms block timeout gathers at 32, 128 and 256 kpps (a walker that fell behind
takes several blocks at once)."""


class BenchRing(MemoryRing):
    """tests/memory_ring.py's ring with a kick that sends nothing (the syscall is not ours to time): the
    TX slots are made AVAILABLE again between blocks, outside the timing."""

    def tx_kick(self) -> None:
        self.tx_pending = 0

    def tx_reset(self) -> None:
        self.u8[self.tx_base :] = 0
        self.tx_index = 0


def walker_ns(frames: list[bytes], make: Callable[[], Balancer], processor: ProcessorFactory,
              block: int) -> dict[str, float]:
    """The walker's per-frame costs with `processor` over blocks of `block` frames (median of 5 runs over
    all `frames`, the balancer's table already full): reading the block's frame headers (RX), the
    processor, writing the TX ring (TX)."""
    blocks = [frames[i : i + block] for i in range(0, len(frames) - block + 1, block)]
    ring = BenchRing(rx_blocks=1, tx_frames=2 * block)
    ring.tx_kick_at = ring.tx_frames  # no kick inside a block
    balancer = make()
    walker = RingWalker(ring, processor(balancer))
    for b in blocks:  # fill the connection table: the steady state of random flows (LRU evicts)
        ring.fill(b)
        walker.step(1.0)
        ring.tx_reset()
    out: dict[str, list[float]] = {"rx": [], "process": [], "tx": []}
    for _ in range(5):
        t = {"rx": 0, "process": 0, "tx": 0}
        for b in blocks:
            ring.fill(b)
            base, num, first = ring.next_block()  # type: ignore[misc]
            t0 = time.thread_time_ns()
            rx = walker.rx_block([(base, num, first)])
            t1 = time.thread_time_ns()
            sent = walker.process(rx, 1.0)
            t2 = time.thread_time_ns()
            walker.send(sent)
            t3 = time.thread_time_ns()
            ring.release_block(base)
            ring.tx_reset()
            t["rx"] += t1 - t0
            t["process"] += t2 - t1
            t["tx"] += t3 - t2
        for k in t:
            out[k].append(t[k] / (len(blocks) * block))
    ring.close()
    return {k: statistics.median(v) for k, v in out.items()}


def per_item_ns(fn, items, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t0 = time.thread_time_ns()
        fn(items)
        times.append((time.thread_time_ns() - t0) / len(items))
    return statistics.median(times)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    try:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    except OSError:
        pass
    rng = random.Random(1)
    rand = frames(n, rng)
    one = [rand[0]] * n
    keys = [inner_flow_key(f[38:84], 20) for f in rand]
    inners = [f[38:84] for f in rand]
    r: dict[str, float] = {}

    def run_decide(b: Balancer):
        def go(items):
            d = b.decide
            for f in items:
                d(f, 1.0)
        return go

    r["bare loop over the list (included in the rest)"] = per_item_ns(lambda items: [None for _ in items], rand)
    b = balancer()
    b.decide(one[0], 1.0)
    r["decide, one flow (hit)"] = per_item_ns(run_decide(b), one)
    # empty table each run: a fresh balancer per run, table built outside the timing
    times = []
    for _ in range(5):
        b = balancer()
        t0 = time.thread_time_ns()
        run_decide(b)(rand)
        times.append((time.thread_time_ns() - t0) / n)
    r["decide, random flows, table empty"] = statistics.median(times)
    b = balancer(capacity=n // 4)
    run_decide(b)(rand)  # fill it
    r["decide, random flows, table full (LRU evicts)"] = per_item_ns(run_decide(b), rand)
    r["  flow_hash(key)"] = per_item_ns(lambda items: [flow_hash(k) for k in items], keys)
    r["  inner_flow_key(inner)"] = per_item_ns(lambda items: [inner_flow_key(i, 20) for i in items], inners)
    r["  outer checksum (20 bytes)"] = per_item_ns(lambda items: [ones_complement_sum(f[14:34]) for f in items], rand)
    r["  slice inner packet"] = per_item_ns(lambda items: [f[38:84] for f in items], rand)
    t = ConnectionTable(1 << 20)
    th = ConnectionTable(1 << 20)
    for k in keys[:1000]:
        th.insert(k, 1, 1.0)
    r["  conntrack.lookup, hit (refresh + move_to_end)"] = per_item_ns(lambda items: [th.lookup(k, 1.0) for k in items], keys[:1000] * (n // 1000))
    from rusty_rail.core.verdict import Forward

    r["  Forward(frame, backend)"] = per_item_ns(lambda items: [Forward(i, 1) for i in items], inners)
    r["  conntrack.lookup, absent"] = per_item_ns(lambda items: [t.lookup(k, 1.0) for k in items], keys)
    t2 = ConnectionTable(n // 4)

    def ins(items):
        for k in items:
            t2.insert(k, 1, 1.0)
    ins(keys)
    r["  conntrack.insert, new key, evicting"] = per_item_ns(ins, keys)
    b = balancer()
    prefix = b._prefixes[next(iter(b._prefixes))]
    r["  output bytes (4 concatenations)"] = per_item_ns(
        lambda items: [prefix[0] + b"x" * 20 + prefix[1] + b"\0\0\x08\0" + i for i in items], inners)

    for block in BLOCKS:
        for name, factory in (("decide_blocks", decide_blocks), ("bulk", bulk_blocks)):
            walked = walker_ns(rand, lambda: balancer(capacity=n // 4), factory, block)
            r[f"walker, blocks of {block}, {name}: RX (frame headers)"] = walked["rx"]
            r[f"walker, blocks of {block}, {name}: process (random flows, table full)"] = walked["process"]
            r[f"walker, blocks of {block}, {name}: TX ring writes (without the kick)"] = walked["tx"]
            r[f"walker, blocks of {block}, {name}: total"] = sum(walked.values())
    width = max(map(len, r))
    print(f"{'case':{width}} {'ns/pkt':>8}")
    for k, val in r.items():
        print(f"{k:{width}} {val:8.0f}")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"afpacket_costs-{stamp}.json"
    path.write_text(json.dumps({"bench": "afpacket_costs", "time": stamp, "packets": n, "python": sys.version,
                                "ns_per_packet": r}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
