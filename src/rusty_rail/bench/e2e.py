"""End to end against what a user would pick instead: real tools through the lab, ratios to the direct path.

Topology 2 (one client, one balancer host, two servers; rusty_rail.lab). Paths, all in the same run:

    direct          client -> server1's own address: no balancer, no tunnel (the limit)
    gre             client -> VIP, the router's GRE straight to the servers (GRE without a balancer)
    rr-xdp          client -> VIP -> router GRE -> Rusty Rail, XDP engine (xdp_mode auto) -> servers (DSR)
    rr-xdp-generic  the same, XDP attached in generic (skb) mode
    rr-afpacket     the same, AF_PACKET engine
    haproxy         client -> the balancer host's address: HAProxy mode tcp, a full proxy, -> servers
    nft             client -> the balancer host's address: nftables DNAT + masquerade -> servers

Tests: iperf3 upload (client sends; the balancer carries the data) and download (-R: with DSR the
balancer carries only ACKs), and wrk against nginx with 1 KiB and 1 MiB objects over 64 connections.
iperf3 always reaches server1 (its control and data connections must meet the same server: every
balanced path lists only server1 for port 5201); HTTP is spread over both servers.

Modes: "lab" is the lab as it is (veth offloads as the kernel sets them: TSO/GSO on, so a hop may
carry 64 KB super-packets); "wire" turns TSO, GSO and GRO off on every veth in the lab, so every hop
carries MTU-sized frames as a real wire would, and keeps each flow on one CPU (flow_per_cpu). In both,
the XDP_PASS program the lab keeps on the balancer's bridge port (for native XDP_TX) is there only
for the path that needs it, rr-xdp (no_peer_xdp).

Each round visits every path (in a rotated order, so slow drift of a shared machine's load does not
favour one path), and every figure is a median over the rounds; the ratio is a path's median over the
direct path's median of the same mode. Per iperf3 test also: the sender's TCP retransmissions, and
the receiver's out-of-order segments (TcpExt TCPOFOQueue) and the sender's reordering detections
(TCPSACKReorder, TCPTSReorder), so reordering on a path shows as a number; and the frames the receiver's
device took per MB received (a TSO or GRO super-packet once), which tells a path that forwards every
segment as the router sent it (a balancer, DSR) from one whose last hop sends its own super-packets
(a full proxy's TCP toward the server).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..lab import netns
from ..lab.lab import Lab
from .peers import HTTP_PORT, IPERF_PORT, Haproxy, NftDnat, Servers

PATHS = ("direct", "gre", "rr-xdp", "rr-xdp-generic", "rr-afpacket", "haproxy", "nft")
TESTS = ("upload", "download", "wrk-1k", "wrk-1m")
WIRE_TESTS = ("upload", "download")
CONNECTIONS = 64
REORDER_COUNTERS = ("TCPOFOQueue", "TCPSACKReorder", "TCPTSReorder", "TCPRenoReorder")
_RR_ENGINES = {"rr-xdp": ("xdp", "auto"), "rr-xdp-generic": ("xdp", "generic"), "rr-afpacket": ("afpacket", "auto")}


@dataclass
class Settings:
    rounds: int = 5
    seconds: float = 5.0
    paths: Sequence[str] = PATHS
    tests: Sequence[str] = TESTS
    wire_tests: Sequence[str] = WIRE_TESTS
    prefix: str = "rrbench-"
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))


def balancer_config(lab: Lab, engine: str, xdp_mode: str) -> str:
    """The configuration file of a Rusty Rail path: HTTP over both servers, iperf3 to server1. Its control
    socket is the lab's, not the default one a daemon of the host (or a test) may hold."""
    lb, servers = lab.balancers[0], lab.servers
    http = ", ".join(f'"{s.address}"' for s in servers)
    return f"""device = "{lb.device}"
engine = "{engine}"
xdp_mode = "{xdp_mode}"
control_socket = "{lab.log_dir / 'rr-bench.sock'}"

[[services]]
vip = "{lab.vip}"
protocol = "tcp"
port = {HTTP_PORT}
backends = [{http}]

[[services]]
vip = "{lab.vip}"
protocol = "tcp"
port = {IPERF_PORT}
backends = ["{servers[0].address}"]
"""


WIRE_OFF = ("tso", "gso", "gro")


def wire_like(lab: Lab) -> None:
    """TSO, GSO and GRO off on both ends of every veth in the lab (ethtool -K, in each namespace), and
    every flow kept on one CPU from its first hop on (flow_per_cpu); RuntimeError naming the device if
    an offload stays on."""
    p = lab.plan
    for h in (*p.clients, p.router_c, p.router, *p.balancers, *p.servers):
        for ns, device in ((h.namespace, h.device), (p.net_ns, h.bridge_port)):
            for feature in WIRE_OFF:
                with contextlib.suppress(OSError):  # refused: checked below
                    netns.offloads_off(ns, device, (feature,))
                if netns.offload_on(ns, device, feature):
                    raise RuntimeError(f"{ns}/{device}: {feature} stays on")
    flow_per_cpu(lab)


def flow_per_cpu(lab: Lab) -> None:
    """RPS over every CPU on the bridge port where the senders' (clients', servers') frames first
    arrive, as a NIC's RSS keeps a flow on one queue.

    Why: a veth hands each frame to the backlog of the CPU that sends it, and a TCP sender sends from
    whichever CPU runs it or handles its ACKs, so consecutive segments of one flow sit in two CPUs'
    backlogs and overtake each other. Measured in wire-like uploads (5 s, one round each): 1770-2630
    retransmissions on the direct and GRE paths, nearly all spurious (TCPDSACKRecv 2000-2400 at the
    sender), TCPOFOQueue 2560-6890 at the receiver, with no drop counted anywhere; with RPS on these
    ports 13-32 retransmissions and TCPOFOQueue 0 on every path. Steered by the flow's hash, every later
    hop of the flow runs on that one CPU, so it stays in order to the end.

    Not on the balancers' ports: the engines send no TCP of their own, so their forwards leave in the
    order they came. Tried (5 rounds each, two runs): with RPS there as well, a forwarded flow whose
    hash names the other CPU moved there at the balancer's port, and rr-xdp's upload fell from 0.934x
    to 0.789x of the GRE path (rounds 1.03-2.18 Gbit/s), generic XDP from 0.984x to 0.915x; HAProxy,
    a TCP sender on the balancer host, had 52 retransmissions instead of 242."""
    p = lab.plan
    mask = format(sum(1 << cpu for cpu in os.sched_getaffinity(0)), "x")
    for h in (*p.clients, *p.servers):
        # sysfs as the namespace sees it (`ip netns exec` mounts it): the device is the lab's, not the host's
        lab.run(p.net_ns, ["tee", f"/sys/class/net/{h.bridge_port}/queues/rx-0/rps_cpus"], input=mask)


# -- the tools ---------------------------------------------------------------------------------------

def iperf3(lab: Lab, host: str, seconds: float, reverse: bool) -> dict[str, float]:
    client = lab.clients[0]
    argv = ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J", *(["-R"] if reverse else [])]
    sink = client if reverse else lab.servers[0]
    before, frames_before = _tcp_counters(lab), netns.rx_packets(sink.namespace, sink.device)
    done = lab.run(client.namespace, argv, check=False, timeout=seconds + 30)
    after, frames = _tcp_counters(lab), netns.rx_packets(sink.namespace, sink.device) - frames_before
    try:
        end = json.loads(done.stdout)["end"]
        received = end["sum_received"]["bits_per_second"]
        megabytes = end["sum_received"]["bytes"] / 1e6
    except (ValueError, KeyError) as exc:
        raise RuntimeError(f"iperf3 to {host}: {done.stdout[-500:]}{done.stderr[-500:]}") from exc
    sender, receiver = (lab.servers[0].name, "client") if reverse else ("client", lab.servers[0].name)
    return {"value": received / 1e9, "retransmits": float(end["sum_sent"].get("retransmits", 0)),
            "ofo_queued": float(after[receiver]["TCPOFOQueue"] - before[receiver]["TCPOFOQueue"]),
            "reorder_seen": float(sum(after[sender][k] - before[sender][k] for k in REORDER_COUNTERS[1:])),
            "frames_per_mb": frames / megabytes if megabytes else 0.0}


_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk(lab: Lab, host: str, path: str, seconds: float) -> dict[str, float]:
    client = lab.clients[0]
    argv = ["wrk", "-t", "2", "-c", str(CONNECTIONS), "-d", f"{seconds:g}s", "--timeout", "5s",
            f"http://{host}:{HTTP_PORT}/{path}"]
    done = lab.run(client.namespace, argv, check=False, timeout=seconds + 30)
    rps = _RPS.search(done.stdout)
    if done.returncode != 0 or not rps:
        raise RuntimeError(f"wrk {host}/{path}: {done.stdout[-500:]}{done.stderr[-500:]}")
    socket_errors = _ERRORS.search(done.stdout)
    non2xx = _NON_2XX.search(done.stdout)
    errors = sum(map(int, socket_errors.groups())) if socket_errors else 0
    return {"value": float(rps.group(1)), "errors": float(errors + (int(non2xx.group(1)) if non2xx else 0))}


def _tcp_counters(lab: Lab) -> dict[str, dict[str, int]]:
    """TcpExt counters of the client and of server1, from their namespaces' /proc/net/netstat."""
    out = {}
    for name, ns in (("client", lab.clients[0].namespace), (lab.servers[0].name, lab.servers[0].namespace)):
        lines = [ln.split() for ln in lab.run(ns, ["cat", "/proc/net/netstat"]).stdout.splitlines()
                 if ln.startswith("TcpExt:")]
        values = dict(zip(lines[0][1:], map(int, lines[1][1:])))
        out[name] = {k: values.get(k, 0) for k in REORDER_COUNTERS}
    return out


def measure(lab: Lab, test: str, host: str, seconds: float) -> dict[str, float]:
    if test in ("upload", "download"):
        return iperf3(lab, host, seconds, reverse=test == "download")
    return wrk(lab, host, test.removeprefix("wrk-"), seconds)


# -- the paths ---------------------------------------------------------------------------------------

def _probe(lab: Lab, host: str, timeout: float = 30.0) -> None:
    """An HTTP GET of /1k from the client to host succeeds (poll with a deadline), or RuntimeError."""
    from ..lab import traffic

    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        done = lab.run(lab.clients[0].namespace, [lab.python, "-m", "rusty_rail.lab.traffic", "--host", host,
                                                  "-n", "1", "--path", "/1k", "--timeout", "1"], check=False)
        results = traffic.parse(done.stdout) if done.returncode in (0, 1) else []
        if results and results[0].ok:
            return
        last = results[0].error if results else done.stderr[-300:]
        time.sleep(0.2)  # poll interval; the deadline bounds the wait
    raise RuntimeError(f"{host}: no HTTP answer within {timeout:.0f} s ({last})")


NATIVE_XDP_PATHS = ("rr-xdp",)
"""Paths that need the XDP_PASS program the lab keeps on each balancer's bridge port (lab/build.py):
native XDP_TX on a veth delivers only to a peer that runs XDP."""


@contextlib.contextmanager
def no_peer_xdp(lab: Lab) -> Iterator[None]:
    """The balancers' bridge ports without their XDP_PASS program while inside, put back on exit.

    Why: with XDP on the bridge port, every frame a balancer sends (AF_PACKET, HAProxy, nft, generic
    XDP) takes the veth's XDP receive path, which copies each frame into a page of its own
    (skb_pp_cow_data) before the bridge sees it; a wire has nothing of the kind. Measured with perf on
    the AF_PACKET worker in an upload (lab mode): veth_xdp_rcv 10.5% of its time, skb_pp_cow_data 7.8%."""
    from ..engines.xdp import attach_pass, detach_all

    ports = [lb.bridge_port for lb in lab.balancers]
    for port in ports:
        detach_all(port, netns=lab.plan.net_ns)
    try:
        yield
    finally:
        for port in ports:
            attach_pass(port, mode="native", netns=lab.plan.net_ns)


@contextlib.contextmanager
def path(lab: Lab, name: str) -> Iterator[str]:
    """Set the lab up for path `name`, yield the address the client connects to, undo on exit."""
    if name in PATHS and name not in NATIVE_XDP_PATHS:
        with no_peer_xdp(lab), _path(lab, name) as host:
            yield host
    else:
        with _path(lab, name) as host:
            yield host


@contextlib.contextmanager
def _path(lab: Lab, name: str) -> Iterator[str]:
    lb = lab.balancers[0]
    if name == "direct":
        yield lab.servers[0].address
    elif name == "gre":
        # GRE without a balancer: iperf3 needs one server for both its connections, so server1 only.
        lab.set_targets([lab.servers[0].address])
        _probe(lab, lab.vip)
        yield lab.vip
    elif name in _RR_ENGINES:
        engine, mode = _RR_ENGINES[name]
        config = lab.log_dir / f"{name}.toml"
        config.write_text(balancer_config(lab, engine, mode))
        lab.route_to_balancers()
        procs = lab.start_balancers_with_config(str(config))
        try:
            _probe(lab, lab.vip)
            yield lab.vip
        finally:
            for p in procs:
                netns.stop(p, 15)
            lab.reset_balancer(lb, check=False)
    elif name in ("haproxy", "nft"):
        peer = Haproxy(lab) if name == "haproxy" else NftDnat(lab)
        peer.start()
        try:
            _probe(lab, lb.address)
            yield lb.address
        finally:
            peer.stop()
    else:
        raise ValueError(f"unknown path {name!r}; known: {', '.join(PATHS)}")


# -- the run -----------------------------------------------------------------------------------------

Samples = dict[str, dict[str, dict[str, list[dict[str, float]]]]]
"""mode -> path -> test -> one dict per round (value, and the test's side figures)."""


def run(settings: Settings | None = None) -> dict[str, Any]:
    s = settings or Settings()
    samples: Samples = {}
    with Lab(topology=2, prefix=s.prefix) as lab:
        servers = Servers(lab)
        servers.start()
        try:
            _probe(lab, lab.servers[0].address)
            for mode, tests in (("lab", s.tests), ("wire", s.wire_tests)):
                if not tests:
                    continue
                if mode == "wire":
                    wire_like(lab)
                samples[mode] = _rounds(lab, s, tests, mode)
        finally:
            servers.stop()
    return {"benchmark": "e2e", "rounds": s.rounds, "seconds": s.seconds, "connections": CONNECTIONS,
            "samples": samples, "summary": summarise(samples)}


def _rounds(lab: Lab, s: Settings, tests: Sequence[str], mode: str) -> dict[str, dict[str, list[dict[str, float]]]]:
    out: dict[str, dict[str, list[dict[str, float]]]] = {p: {t: [] for t in tests} for p in s.paths}
    for r in range(s.rounds):
        order = list(s.paths[r % len(s.paths):]) + list(s.paths[:r % len(s.paths)])
        for name in order:
            with path(lab, name) as host:
                for test in tests:
                    result = measure(lab, test, host, s.seconds)
                    out[name][test].append(result)
                    s.log(f"e2e {mode} round {r + 1}/{s.rounds} {name:15} {test:9} "
                          + " ".join(f"{k}={v:.4g}" for k, v in result.items()))
    return out


def summarise(samples: Samples) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """mode -> test -> path -> median value, ratio to direct (and to gre), spread, side figures."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for mode, paths in samples.items():
        tests = next(iter(paths.values())).keys()
        out[mode] = {}
        for test in tests:
            medians = {p: statistics.median(r["value"] for r in paths[p][test]) for p in paths if paths[p][test]}
            row: dict[str, dict[str, float]] = {}
            for p, m in medians.items():
                values = [r["value"] for r in paths[p][test]]
                entry = {"median": m, "min": min(values), "max": max(values), "rounds": float(len(values))}
                if "direct" in medians:
                    entry["ratio_direct"] = m / medians["direct"]
                if "gre" in medians:
                    entry["ratio_gre"] = m / medians["gre"]
                for side in ("retransmits", "ofo_queued", "reorder_seen", "frames_per_mb", "errors"):
                    if side in paths[p][test][0]:
                        entry[side] = statistics.median(r[side] for r in paths[p][test])
                row[p] = entry
            out[mode][test] = row
    return out


UNITS = {"upload": "Gbit/s", "download": "Gbit/s", "wrk-1k": "requests/s", "wrk-1m": "requests/s"}
"""What a test's value is measured in."""

__all__ = ["PATHS", "Settings", "TESTS", "UNITS", "WIRE_TESTS", "run", "summarise"]
