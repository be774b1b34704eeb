"""Native vs generic XDP vs AF_PACKET on a veth: what each delivers, and what each costs per packet.

    sudo .venv/bin/python bench/veth_xdp_modes.py [--rounds 3] [--rate 50000] [--seconds 3]

The question it answers is engine `auto`'s choice on a veth (engines/device.py): native XDP_TX on a
veth delivers only when the peer runs an XDP program; generic (skb) mode and AF_PACKET deliver with
nothing on the peer. So which should auto take when the peer runs nothing, and what does native cost
where it does deliver?

Topology per variant and round (created here, deleted afterwards, also on failure; nothing on the
host's interfaces): tests.engine_netns.VethPair, lb0 10.77.0.1 in one namespace, peer0 10.77.0.2 in the
other. trafgen on peer0 (CPU0) sends 84-byte GRE frames of random flows (bench/trafgen_frames.py) at
--rate for --seconds. The balancer is the real daemon (`python -m rusty_rail`, the environment form, on
CPU1) with three backends whose next hops are permanent neighbour entries with MACs nobody owns, so
every forward crosses the veth to peer0 and is dropped there as PACKET_OTHERHOST (cheap, no reply).

Variants (the same frames, the same run, in a rotating order per round):
- baseline: bpf/xdp_baseline.o (swap MACs, XDP_TX) attached natively, XDP_PASS on peer0: the cheapest
  forwarder this veth has. Every cost is also given as a ratio to it.
- baseline generic: the same program in generic mode, nothing on peer0 (the mode's own cost).
- native + peer XDP: the daemon, RR_XDP_MODE=native, XDP_PASS on peer0 (what the lab does).
- generic + peer XDP: RR_XDP_MODE=generic, XDP_PASS on peer0 (native vs generic, peer alike).
- generic: RR_XDP_MODE=generic, nothing on peer0 (auto's choice there).
- native: RR_XDP_MODE=native, nothing on peer0 (the blackhole: nothing arrives).
- afpacket: RR_ENGINE=afpacket, nothing on peer0.

Figures per variant (medians over rounds):
- delivered = peer0's rx_packets delta / frames trafgen sent; refused = lb0's tx_dropped delta (where
  veth counts the XDP_TX frames its peer could not take, measured: it equals ethtool's
  rx_queue_0_xdp_tx_errors); the daemon's own forwarded and tx_refused counters (ctl status) beside.
- CPU per delivered frame: the sender's CPU (trafgen, from its rusage: with XDP, the whole receive,
  XDP and peer receive path runs in its softirq on CPU0; this kernel has no IRQ time accounting, so
  softirq work is charged to the task it interrupted) + ksoftirqd/0 and /1 + the daemon's threads
  (schedstat; AF_PACKET's engine runs there). The sender's own cost is in every figure alike, so the
  difference to the baseline ("extra ns") is the variant's own cost; ratios are to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from pyroute2 import IPRoute  # noqa: E402

from bench.procstat import task_ns  # noqa: E402
from bench.trafgen_frames import trafgen_config  # noqa: E402
from rusty_rail.bpf import build, libbpf  # noqa: E402
from rusty_rail.bpf.netns import in_netns  # noqa: E402
from rusty_rail.engines.xdp import attach_pass  # noqa: E402
from tests.engine_netns import VethPair, wait_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = {"10.77.0.101": "02:00:00:00:01:01", "10.77.0.102": "02:00:00:00:01:02", "10.77.0.103": "02:00:00:00:01:03"}
SENDER_MAC = bytes.fromhex("020000000099")
SENDER_CPU, DAEMON_CPU = 0, 1

# name: (what runs on lb0, XDP_PASS on peer0?)
VARIANTS = {
    "baseline": ("baseline:native", True),
    "baseline generic": ("baseline:generic", False),
    "native + peer XDP": ("xdp:native", True),
    "generic + peer XDP": ("xdp:generic", True),
    "generic": ("xdp:generic", False),
    "native": ("xdp:native", False),
    "afpacket": ("afpacket:", False),
}


def stats64(ns: str, dev: str) -> dict[str, int]:
    with in_netns(ns), IPRoute() as ipr:
        return dict(ipr.get_links(ifname=dev)[0].get_attr("IFLA_STATS64"))


def ksoftirqd() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{pid}/comm").read().startswith("ksoftirqd/"):
                pids.append(int(pid))
        except OSError:
            pass
    return pids


class Lb:
    """What runs on lb0: the bare baseline program (attached from here) or the daemon."""

    def __init__(self, v: VethPair, what: str, log: Path) -> None:
        self.v, self.proc, self.obj, self.log = v, None, None, log
        kind, mode = what.split(":")
        if kind == "baseline":
            self.obj = libbpf.BpfObject(str(build.object_path("xdp_baseline")))
            self.obj.load()
            self.flags = libbpf.XDP_FLAGS_DRV_MODE if mode == "native" else libbpf.XDP_FLAGS_SKB_MODE
            with in_netns(v.lb_ns):
                libbpf.xdp_attach(v.lb_ifindex, self.obj.program("rr_baseline").fd, self.flags)
            return
        env = {**os.environ, "RR_DEVICE": v.lb_dev, "RR_TARGET_IPS": ";".join(BACKENDS), "RR_ENGINE": kind or "auto"}
        if mode:
            env["RR_XDP_MODE"] = mode
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(["ip", "netns", "exec", v.lb_ns, "taskset", "-c", str(DAEMON_CPU),
                                          sys.executable, "-m", "rusty_rail"], env=env, stdout=out, stderr=out)
        wait_for(lambda: self.events("started") or self.proc.poll() is not None, 30, 0.05, "daemon started")
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited: {log.read_text()[-2000:]}")

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                out.append(event)
        return out

    def cpu_ns(self) -> int:
        return task_ns(self.proc.pid) if self.proc is not None else 0

    def close(self) -> dict[str, Any]:
        if self.obj is not None:
            with in_netns(self.v.lb_ns):
                libbpf.xdp_detach(self.v.lb_ifindex, self.flags)
            self.obj.close()
            return {}
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)
        stopped = self.events("stopped")
        return stopped[-1]["counters"] if stopped else {}


def trafgen(v: VethPair, cfg: str, packets: int, rate: int) -> tuple[int, int]:
    """trafgen on peer0, pinned to the sender CPU: (packets sent, its CPU time in ns from rusage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(["ip", "netns", "exec", v.peer_ns, "taskset", "-c", str(SENDER_CPU), "trafgen", "-o",
                        v.peer_dev, "-i", cfg, "-n", str(packets), "-P", "1", "--no-sock-mem", "-Q",
                        "-b", f"{rate}pps"], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"trafgen failed ({r.returncode}): {r.stderr[-500:]}")
    sent = next((int(w) for line in (r.stdout + r.stderr).splitlines() if "packets outgoing" in line
                 for w in line.split() if w.isdigit()), packets)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1e9
    return sent, int(cpu)


def run_variant(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    what, peer_xdp = VARIANTS[name]
    v = VethPair()
    with ExitStack() as stack:
        stack.callback(v.close)
        for ns in (v.lb_ns, v.peer_ns):  # no IPv6 chatter in the counters
            v.run(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        for b, mac in BACKENDS.items():
            v.ip(v.lb_ns, "neigh", "replace", b, "lladdr", mac, "dev", v.lb_dev, "nud", "permanent")
        if peer_xdp:
            attach_pass(v.peer_dev, netns=v.peer_ns)
        cfg = workdir / "frames.cfg"
        cfg.write_text(trafgen_config(v, "random", SENDER_MAC))
        lb = Lb(v, what, workdir / f"daemon-{name.replace(' ', '_')}.log")
        closed: dict[str, Any] = {}
        try:
            soft = ksoftirqd()
            lb0, peer0 = stats64(v.lb_ns, v.lb_dev), stats64(v.peer_ns, v.peer_dev)
            soft0, daemon0 = sum(map(task_ns, soft)), lb.cpu_ns()
            sent, sender_ns = trafgen(v, str(cfg), int(args.rate * args.seconds), args.rate)
            # Drained: peer0's counter has not moved for 0.3 s (AF_PACKET may lag behind the sender).
            last, t_last = stats64(v.peer_ns, v.peer_dev)["rx_packets"], time.monotonic()
            while time.monotonic() - t_last < 0.3:
                time.sleep(0.05)
                now = stats64(v.peer_ns, v.peer_dev)["rx_packets"]
                if now != last:
                    last, t_last = now, time.monotonic()
            soft1, daemon1 = sum(map(task_ns, soft)), lb.cpu_ns()
            lb1, peer1 = stats64(v.lb_ns, v.lb_dev), stats64(v.peer_ns, v.peer_dev)
        finally:
            closed = lb.close()
    delivered = peer1["rx_packets"] - peer0["rx_packets"]
    cpu = sender_ns + (soft1 - soft0) + (daemon1 - daemon0)
    return {
        "sent": sent, "delivered": delivered, "delivered_ratio": delivered / max(sent, 1),
        "refused": lb1["tx_dropped"] - lb0["tx_dropped"],
        "forwarded": closed.get("forwarded"), "tx_refused": closed.get("drop_tx_refused"),
        "cpu_ns": cpu, "sender_ns": sender_ns, "daemon_ns": daemon1 - daemon0, "ksoftirqd_ns": soft1 - soft0,
        "ns_per_delivered": cpu / delivered if delivered else None, "ns_per_sent": cpu / max(sent, 1),
    }


def summarise(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    def med(name: str, key: str) -> float | None:
        values = [r[key] for r in rows[name] if r[key] is not None]
        return statistics.median(values) if values else None

    base = med("baseline", "ns_per_delivered") if "baseline" in rows else None
    lines = [f"{'variant':20} {'delivered':>10} {'refused':>9} {'forwarded':>10} {'tx_refused':>10} "
             f"{'ns/delivered':>13} {'extra ns':>9} {'x baseline':>10}"]
    for name in rows:
        cost = med(name, "ns_per_delivered")
        forwarded, tx_refused = med(name, "forwarded"), med(name, "tx_refused")
        lines.append(
            f"{name:20} {med(name, 'delivered_ratio'):10.2%} {med(name, 'refused'):9.0f} "
            f"{'-' if forwarded is None else f'{forwarded:.0f}':>10} {'-' if tx_refused is None else f'{tx_refused:.0f}':>10} "
            f"{'-' if cost is None else f'{cost:.0f}':>13} {'-' if cost is None or base is None else f'{cost - base:+.0f}':>9} "
            f"{'-' if cost is None or base is None else f'{cost / base:.2f}':>10}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=int, default=50_000, help="packets per second trafgen sends")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("veth_xdp_modes: needs root (namespaces, XDP)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s): {unknown}")
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    load0 = os.getloadavg()
    print(f"veth_xdp_modes: {args.rate} pps x {args.seconds:g} s of 84-byte GRE frames, random flows, "
          f"{args.rounds} round(s); load {load0[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                r = run_variant(name, args, Path(tmp))
                rows[name].append(r)
                cost = r["ns_per_delivered"]
                print(f"  round {round_ + 1} {name:20} delivered {r['delivered']}/{r['sent']} refused {r['refused']} "
                      f"forwarded {r['forwarded']} tx_refused {r['tx_refused']} "
                      f"{'-' if cost is None else f'{cost:.0f}'} ns/delivered (sender {r['sender_ns'] / max(r['sent'], 1):.0f}, "
                      f"daemon {r['daemon_ns'] / max(r['sent'], 1):.0f}, ksoftirqd {r['ksoftirqd_ns'] / max(r['sent'], 1):.0f} "
                      f"ns/sent)", flush=True)
    lines = summarise(rows)
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"veth_xdp_modes-{stamp}.json"
    path.write_text(json.dumps({"bench": "veth_xdp_modes", "time": stamp, "kernel": platform.release(),
                                "rate_pps": args.rate, "seconds": args.seconds, "rounds": args.rounds,
                                "loadavg": [load0, os.getloadavg()], "rows": rows, "summary": lines}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
