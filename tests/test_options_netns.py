"""Issue 12's per-service options in real namespaces (docs/WIRE.md 8b and 11), each run the way an operator
runs it: `rusty-rail run --config FILE` with `[[services]]` options.

- `hash = "source-ip"`: 20 real HTTP connections of one client (Lab, topology 2) all land on one server.
- Path MTU discovery (8b): the client's path is 1500 bytes (Lab(core_mtu=1524): the router's tunnel
  fits), the balancer's route to the servers 1500, so the tunnel toward the backends carries 1476; a
  full-size DF segment gets "fragmentation needed" (MTU 1476) from the balancer, the client's kernel
  learns it, and the upload completes.
- `answer_ping`: `ping` to the VIP answered by the balancer, its only backend an address nobody holds.
- `quic = true` (11.4): a VethPair; short-header packets whose connection ID names a backend's
  `server_id` keep that backend when the client's address and port change mid-stream.

Each test has its own lab or VethPair, torn down also on failure. Nothing sleeps to synchronise.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from rusty_rail.engines.xdp import attach_pass, default_object_path
from rusty_rail.lab import Lab, netns
from rusty_rail.lab.topology import STANDARD_MTU, TUNNEL_MTU
from tests.engine_netns import VethPair, gre_frame, ipv4, pending, udp, wait_for
from tests.lab_config import VIP, config_text
from tests.test_lab_netns import _wait_until_served, stop_balancers

pytestmark = pytest.mark.netns

ENGINES = pytest.mark.parametrize("engine", ["afpacket", "xdp"])
_counter = itertools.count()


def _need_bpf(engine: str) -> None:
    if engine == "xdp" and not default_object_path().exists():
        pytest.skip("run `make bpf` first")


def ctl_status(socket_path: Path) -> dict[str, Any] | None:
    r = subprocess.run([sys.executable, "-m", "rusty_rail", "ctl", "--socket", str(socket_path), "status", "--json"],
                       capture_output=True, text=True, timeout=30)
    return json.loads(r.stdout) if r.returncode == 0 else None


@pytest.fixture
def lab_prefix() -> Iterator[str]:
    p = f"ro{os.getpid() % 100000}x{next(_counter)}-"
    try:
        yield p
    finally:
        Lab(1, p).down()
        assert netns.with_prefix(p) == []


def _run_balancer(lab: Lab, config: Path, text: str, log: Path) -> list[subprocess.Popen[bytes]]:
    config.write_text(text)
    with log.open("ab") as out:
        return lab.start_balancers_with_config(str(config), stdout=out, stderr=out)


@ENGINES
def test_source_ip_hash_puts_a_clients_connections_on_one_server(lab_prefix: str, tmp_path: Path, engine: str) -> None:
    _need_bpf(engine)
    sock, log = tmp_path / "ctl.sock", tmp_path / "balancer.log"
    with Lab(2, lab_prefix) as lab:
        text = config_text(engine, sock, [s.address for s in lab.servers], extra_service='hash = "source-ip"')
        procs = _run_balancer(lab, tmp_path / "rr.toml", text, log)
        _wait_until_served(lab, 20)
        results = lab.traffic(n=20)
        status = ctl_status(sock)
        stop_balancers(procs, logs=[log])
    assert [r.error for r in results if not r.ok] == []
    servers = {r.server for r in results}
    ports = {r.sport for r in results}
    print(f"{engine}: 20 connections from {len(ports)} source ports -> {servers}")
    assert len(ports) == 20, "each request a new connection"
    assert len(servers) == 1, f"source-ip hashing spread one client over {servers}"
    assert status is not None and status["services"][0]["options"]["hash"] == "source-ip", status["services"][0]


@ENGINES
def test_path_mtu_discovery_through_the_balancer(lab_prefix: str, tmp_path: Path, engine: str) -> None:
    _need_bpf(engine)
    sock, log = tmp_path / "ctl.sock", tmp_path / "balancer.log"
    upload = 200_000
    with Lab(2, lab_prefix, core_mtu=STANDARD_MTU + 24) as lab:
        client = lab.clients[0]
        with IPRoute(netns=client.namespace) as ipr:
            (route,) = ipr.route("get", dst=VIP)
            assert route.get_nested("RTA_METRICS", "RTAX_MTU") == STANDARD_MTU, "the client's path is 1500 bytes"
        # Segments as a wire carries them: with TSO/GSO the client's super-packets would reach the router
        # whole, and its encapsulation (bpf_skb_adjust_room without BPF_F_ADJ_ROOM_FIXED_GSO) would cut them
        # to fit its own MTU, hiding the balancer's limit.
        netns.offloads_off(client.namespace, client.device)
        procs = _run_balancer(lab, tmp_path / "rr.toml", config_text(engine, sock, [s.address for s in lab.servers]), log)
        _wait_until_served(lab, 20)
        before = ctl_status(sock)
        # A POST: the client's segments are full-size (1500 bytes, DF: Linux TCP sets it), 24 bytes too
        # many for the tunnel toward the servers.
        results = lab.traffic(n=1, upload=upload, timeout=10)
        after = ctl_status(sock)
        with IPRoute(netns=client.namespace) as ipr:
            (learnt,) = ipr.route("get", dst=VIP)
        stop_balancers(procs, logs=[log])
    assert [r.error for r in results if not r.ok] == [], "the upload did not complete"
    assert before is not None and after is not None
    answered = after["counters"]["options"]["icmp_too_big"] - before["counters"]["options"]["icmp_too_big"]
    path_mtu = learnt.get_nested("RTA_METRICS", "RTAX_MTU")
    print(f"{engine}: {upload}-byte POST completed in {results[0].seconds:.2f}s; the balancer answered "
          f"{answered} too-big; the client's path MTU to {VIP} is now {path_mtu}")
    assert answered >= 1, "no fragmentation-needed was sent by the balancer"
    assert path_mtu == TUNNEL_MTU, "the client did not learn the tunnel's MTU from the balancer's answer"


@ENGINES
def test_ping_to_a_vip_is_answered_by_the_balancer(lab_prefix: str, tmp_path: Path, engine: str) -> None:
    _need_bpf(engine)
    sock, log = tmp_path / "ctl.sock", tmp_path / "balancer.log"
    nobody = "192.168.137.250"  # on V, held by no host: a forwarded echo request would go nowhere
    text = f"""\
device = "eth0"
engine = "{engine}"
table_size = 1009
control_socket = "{sock}"
workers = 1

[[services]]
vip = "{VIP}"
protocol = "any"
backends = ["{nobody}"]
"""
    with Lab(1, lab_prefix) as lab:
        procs = _run_balancer(lab, tmp_path / "rr.toml", text, log)
        wait_for(lambda: (ctl_status(sock) or {}).get("ready"), timeout=30, interval=0.1, what="the balancer ready")
        ping = lab.run(lab.clients[0].namespace, ["ping", "-c", "3", "-i", "0.2", "-W", "2", VIP], check=False)
        status = ctl_status(sock)
        stop_balancers(procs, logs=[log])
    print(f"{engine}: {ping.stdout.strip().splitlines()[-2:]}")
    assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
    assert status is not None and status["counters"]["options"]["icmp_echo_replies"] >= 3, status["counters"]


# -- QUIC: a VethPair; the peer plays the router and both backends ---------------------------------------

QUIC_VIP = "10.1.0.9"
QUIC_BACKENDS = {"10.77.0.11": 1, "10.77.0.12": 2}


def quic_short_header(server_id: int, packet_number: int) -> bytes:
    """A QUIC short header (RFC 9000 17.3: form bit clear, fixed bit set) whose destination connection ID
    has the QUIC-LB plaintext layout WIRE.md 11.4 documents: config rotation bits 0, the 2-byte server
    ID, then the server's own bytes; then a packet number and an opaque payload."""
    cid = bytes([0x05]) + server_id.to_bytes(2, "big") + bytes.fromhex("a1b2c3d4e5")
    return bytes([0x40]) + cid + packet_number.to_bytes(2, "big") + b"quic-like payload"


def _gre_backend(lb_mac: bytes, frame: bytes) -> str | None:
    """The outer destination of a GRE frame the balancer sent (IPv4 outer), else None."""
    if frame[6:12] != lb_mac or frame[12:14] != b"\x08\x00" or frame[23] != 47:
        return None
    return socket.inet_ntoa(frame[30:34])


@ENGINES
def test_quic_flow_keeps_its_server_when_the_client_moves(veth: VethPair, tmp_path: Path, engine: str) -> None:
    _need_bpf(engine)
    v = veth
    for address in QUIC_BACKENDS:
        v.ip(v.peer_ns, "addr", "add", f"{address}/24", "dev", v.peer_dev)
    attach_pass(v.peer_dev, netns=v.peer_ns)
    sock, log, config = tmp_path / "ctl.sock", tmp_path / "daemon.log", tmp_path / "rr.toml"
    listed = ", ".join(f'{{ address = "{a}", server_id = {i} }}' for a, i in QUIC_BACKENDS.items())
    config.write_text(f"""\
device = "{v.lb_dev}"
engine = "{engine}"
table_size = 1009
control_socket = "{sock}"
workers = 1

[[services]]
vip = "{QUIC_VIP}"
protocol = "udp"
port = 443
quic = true
backends = [{listed}]
""")
    cap = v.peer_packet_socket()
    with log.open("wb") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", v.lb_ns, sys.executable, "-m", "rusty_rail", "run",
                                 "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is None and (ctl_status(sock) or {}).get("ready"), timeout=30, interval=0.1,
                 what=f"the daemon ready\n{log.read_text(errors='replace')[-2000:]}")

        def send(client: str, sport: int, server_id: int, number: int) -> None:
            inner = ipv4(client, QUIC_VIP, 17, udp(sport, 443, quic_short_header(server_id, number)))
            cap.send(gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, inner))

        def backends_reached() -> set[str]:
            return {b for b in (_gre_backend(v.lb_mac, f) for f in pending(cap, lambda f: True)) if b}

        # Warm-up: both next hops learnt (frames before that are NO_NEIGHBOUR drops by design).
        warm = iter(range(1, 10_000))
        seen: set[str] = set()

        def both_learnt() -> bool:
            n = next(warm)
            for server_id in QUIC_BACKENDS.values():
                send("10.0.0.200", 1000 + n, server_id, n)
            seen.update(backends_reached())
            return seen == set(QUIC_BACKENDS)
        wait_for(both_learnt, timeout=10, interval=0.05, what="both backends' next hops")
        before = ctl_status(sock)

        # Each stream: 20 packets from one address and port, then 20 from another address, then another
        # port: every packet must reach the backend its connection ID names.
        moves = [("10.0.0.1", 40001), ("10.0.0.77", 40001), ("10.0.0.77", 51234)]
        got: dict[tuple[int, str, int], list[str]] = {}
        for backend_id in QUIC_BACKENDS.values():
            for client, sport in moves:
                for number in range(20):
                    send(client, sport, backend_id, number)
                got[(backend_id, client, sport)] = _collect(cap, v.lb_mac, 20)
        after = ctl_status(sock)
        proc.terminate()
        assert proc.wait(timeout=20) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    by_id = {i: a for a, i in QUIC_BACKENDS.items()}
    for (backend_id, client, sport), backends in got.items():
        assert backends == [by_id[backend_id]] * 20, f"server ID {backend_id} from {client}:{sport} went to {set(backends)}"
    assert before is not None and after is not None
    routed = after["counters"]["options"]["quic_routed"] - before["counters"]["options"]["quic_routed"]
    print(f"{engine}: {len(got)} streams x 20 packets each on the server their CID names; quic_routed +{routed}")
    assert routed == 20 * len(got)


def _collect(cap: socket.socket, lb_mac: bytes, count: int, timeout: float = 5.0) -> list[str]:
    """The backends of the next `count` GRE frames the balancer sends, in order (fails at the deadline)."""
    out: list[str] = []

    def enough() -> bool:
        out.extend(b for b in (_gre_backend(lb_mac, f) for f in pending(cap, lambda f: True)) if b)
        return len(out) >= count
    wait_for(enough, timeout=timeout, interval=0.01, what=f"{count} forwarded frames")
    return out
