"""Issue 10's first line, without the lab: `RR_DEVICE=lb0 RR_TARGET_IPS="<s1>;<s2>" python -m rusty_rail`
balances GRE whose inner packets are IPv6 TCP over two backends, both engines:

- GRE over IPv4, IPv4 backends;
- GRE over IPv6, IPv6 backends.

A VethPair: the daemon runs in the lb namespace, plainly (the environment form; RR_ENGINE picks the
engine under test and RR_CONTROL_SOCKET lets the test read its status). The peer namespace plays the
router and both backends: it sends the GRE, and holds the backends' addresses on the link (two more IPv4
or IPv6 addresses), so the balancer learns their next hop by ARP or neighbour discovery like any other;
its packet socket captures the re-wrapped frames. The peer runs an XDP_PASS program (engines.xdp.
attach_pass): XDP_TX in native mode on a veth only delivers when the peer runs an XDP program too
(../shared/DESIGN.md), and the XDP engine attaches natively here.

Asserted: >= 99% of the frames sent come back re-wrapped (after a warm-up that waits for both next hops:
frames sent while a next hop is unknown are NO_NEIGHBOUR drops by design); every flow on one backend;
each backend's share of the flows within 35-65%; the outer source is the balancer's address of the
backend's family; the inner packet's bytes are unchanged; the status counts the forwards as IPv6, and
`explain` names a flow's backend from its connection entry.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from rusty_rail.engines.xdp import attach_pass, default_object_path
from tests.engine_netns import VethPair, drain, gre_frame, pending, tcp6, wait_for

pytestmark = pytest.mark.netns

FLOWS = 300
PACKETS_PER_FLOW = 4
VIP6 = "2001:db8:1::1"
CASES = {  # the outer family: backends on the peer's side of the link
    "ipv4": ("10.77.0.11", "10.77.0.12"),
    "ipv6": ("2001:db8:77::11", "2001:db8:77::12"),
}


def is_gre_from(mac: bytes, frame: bytes) -> bool:
    if frame[6:12] != mac:
        return False
    return (frame[12:14] == b"\x08\x00" and frame[23] == 47) or (frame[12:14] == b"\x86\xdd" and frame[20] == 47)


def outer_of(frame: bytes) -> tuple[str, str, bytes]:
    """(outer source, outer destination, the inner packet after a 4-byte GRE header)."""
    if frame[12:14] == b"\x08\x00":
        assert frame[34:38] == b"\x00\x00\x86\xdd", "GRE names the inner packet IPv6"
        return socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), frame[38:]
    assert frame[54:58] == b"\x00\x00\x86\xdd" and frame[21] == 64, "GRE names IPv6; hop limit 64"
    src, dst = (socket.inet_ntop(socket.AF_INET6, frame[a:a + 16]) for a in (22, 38))
    return src, dst, frame[58:]


class Daemon:
    """`python -m rusty_rail` in the environment form, in the lb namespace; its output in a file."""

    def __init__(self, v: VethPair, engine: str, targets: tuple[str, str], directory: Path) -> None:
        self.socket = directory / "ctl.sock"
        self.log = directory / "daemon.log"
        env = {**os.environ, "RR_DEVICE": v.lb_dev, "RR_TARGET_IPS": ";".join(targets), "RR_ENGINE": engine,
               "RR_CONTROL_SOCKET": str(self.socket)}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(["ip", "netns", "exec", v.lb_ns, sys.executable, "-m", "rusty_rail"],
                                         env=env, stdout=out, stderr=subprocess.STDOUT)

    def status(self) -> dict | None:
        r = subprocess.run([sys.executable, "-m", "rusty_rail", "ctl", "--socket", str(self.socket), "status", "--json"],
                           capture_output=True, text=True, timeout=30)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def explain(self, client: str, service: str) -> str:
        """`python -m rusty_rail explain CLIENT SERVICE` against the running daemon."""
        r = subprocess.run([sys.executable, "-m", "rusty_rail", "explain", "--socket", str(self.socket), client, service],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def ready(self) -> dict | None:
        assert self.proc.poll() is None, f"the daemon exited:\n{self.log.read_text(errors='replace')[-3000:]}"
        status = self.status()
        return status if status is not None and status["ready"] else None

    def stop(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(timeout=20) == 0, self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("outer", list(CASES))
@pytest.mark.parametrize("engine", ["afpacket", "xdp"])
def test_environment_form_balances_inner_ipv6(veth: VethPair, tmp_path: Path, engine: str, outer: str) -> None:
    if engine == "xdp" and not default_object_path().exists():
        pytest.skip("run `make bpf` first")
    v = veth
    v.add_ipv6()
    backends = CASES[outer]
    for address in backends:  # the backends live on the peer's side: its next hop is learnt, not configured
        v.ip(v.peer_ns, "addr", "add", f"{address}/{64 if ':' in address else 24}", "dev", v.peer_dev,
             *(("nodad",) if ":" in address else ()))
    attach_pass(v.peer_dev, netns=v.peer_ns)
    router, balancer = (v.peer_ip, v.lb_ip) if outer == "ipv4" else (v.peer_ip6, v.lb_ip6)
    cap = v.peer_packet_socket()
    daemon = Daemon(v, engine, backends, tmp_path)
    try:
        wait_for(daemon.ready, timeout=30, interval=0.1, what="the daemon ready")

        def frame(client: int, sport: int, seq: int) -> tuple[bytes, bytes]:
            inner = tcp6(f"2001:db8:c::{client:x}", VIP6, sport, 443, seq.to_bytes(4, "big"))
            return gre_frame(v.lb_mac, v.peer_mac, router, balancer, inner), inner

        # Warm-up: distinct flows until both backends were reached (their next hops resolved).
        reached: set[str] = set()
        probe = iter(range(1, 10_000))

        def both_reached() -> bool:
            cap.send(frame(0xFFFF, next(probe), 0)[0])
            reached.update(outer_of(f)[1] for f in pending(cap, lambda f: is_gre_from(v.lb_mac, f)))
            return reached == set(backends)
        wait_for(both_reached, timeout=10, interval=0.05, what="both backends' next hops")
        forwarded_before = wait_for(daemon.status)["counters"]["by_family"]["ipv6"]["forwarded"]

        sent: dict[bytes, tuple[int, int]] = {}  # inner packet -> its flow
        for seq in range(PACKETS_PER_FLOW):
            for client in range(1, FLOWS + 1):
                raw, inner = frame(client, 40000 + client, seq)
                sent[inner] = (client, 40000 + client)
                cap.send(raw)
        got = drain(cap, lambda f: is_gre_from(v.lb_mac, f), int(len(sent) * 0.99), timeout=20)
        got += pending(cap, lambda f: is_gre_from(v.lb_mac, f))
        status = daemon.status()
        explained = daemon.explain("[2001:db8:c::1]:40001", f"[{VIP6}]:443")
        daemon.stop()
    finally:
        daemon.kill()

    backends_of: dict[tuple[int, int], set[str]] = defaultdict(set)
    for f in got:
        src, dst, inner = outer_of(f)
        assert src == balancer, f"outer source {src}, not the balancer's {balancer}"
        assert inner in sent, "the inner packet's bytes changed"
        backends_of[sent[inner]].add(dst)
    delivered = len(got) / len(sent)
    shares = {b: sum(1 for s in backends_of.values() if s == {b}) / len(backends_of) for b in backends}
    print(f"{engine}, GRE over {outer}: delivered {delivered:.2%} of {len(sent)}; flow shares {shares}")
    assert delivered >= 0.99 and len(got) <= len(sent)
    assert all(len(s) == 1 for s in backends_of.values()), "a flow went to two backends"
    assert set().union(*backends_of.values()) == set(backends)
    assert all(0.35 <= share <= 0.65 for share in shares.values()), shares
    assert status is not None and status["counters"]["by_family"]["ipv6"]["forwarded"] - forwarded_before >= len(got)
    (first_backend,) = backends_of[(1, 40001)]
    assert explained.endswith(f"backend {first_backend} (connection entry)"), explained
