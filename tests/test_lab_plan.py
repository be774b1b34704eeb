"""The lab's pure parts: the addressing plan, the router's BIRD configuration, and the BPF struct mirror."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from rusty_rail.bpf.build import BPF_DIR, object_path
from rusty_rail.lab import TOPOLOGIES, Lab, plan
from rusty_rail.lab.bird import BirdError, BirdSocket, Family, Peer, StaticRoute, render_config, render_static
from rusty_rail.lab.router import CFG, ENDPOINT, ENDPOINT_KEY, MAPS, STATS, EncapConfig


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_plan_matches_the_original(topology: int) -> None:
    p = plan(topology, "rr-")
    clients, servers, balancers = TOPOLOGIES[topology]
    assert [c.address for c in p.clients] == [f"10.0.0.{i}" for i in range(1, clients + 1)]
    assert [s.address for s in p.servers] == [f"192.168.137.{20 + i}" for i in range(1, servers + 1)]
    assert [b.address for b in p.balancers] == [f"192.168.137.{10 + i}" for i in range(1, balancers + 1)]
    assert p.vip == "10.1.0.1"
    # Dual-stack: every host's IPv6 twin repeats its IPv4 address's last octet (topology.py).
    assert [c.address6 for c in p.clients] == [f"2001:db8:c::{i}" for i in range(1, clients + 1)]
    assert [s.address6 for s in p.servers] == [f"2001:db8:137::{20 + i}" for i in range(1, servers + 1)]
    assert [b.address6 for b in p.balancers] == [f"2001:db8:137::{10 + i}" for i in range(1, balancers + 1)]
    assert (p.router.address6, p.router_c.address6, p.vip6) == ("2001:db8:137::1", "2001:db8:c::fe", "2001:db8:1::1")
    assert all(ns.startswith("rr-") for ns in p.namespaces)
    assert len(set(p.namespaces)) == len(p.namespaces)
    macs = [h.mac for h in (*p.clients, p.router_c, p.router, *p.balancers, *p.servers)]
    assert len(set(macs)) == len(macs)
    assert all(len(h.bridge_port) <= 15 for h in (*p.clients, p.router_c, p.router, *p.balancers, *p.servers))


@pytest.mark.parametrize("bad", ["", "-rr", "a b", "x" * 17, "rr/"])
def test_dangerous_prefixes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Lab(1, bad)


@pytest.mark.skipif(shutil.which("bpftool") is None or shutil.which("clang") is None, reason="needs clang, bpftool")
def test_python_mirrors_the_encap_header() -> None:
    btf = subprocess.run(["bpftool", "btf", "dump", "file", str(object_path("router_encap"))],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"STRUCT 'rr_encap_cfg' size=(\d+) vlen=6\n((?:\t.*\n){6})", btf)
    assert m is not None
    assert int(m.group(1)) == CFG.size
    fields = re.findall(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", m.group(2))
    assert fields == [("service_net", "0"), ("service_mask", "32"), ("src", "64"), ("service6_net", "96"),
                      ("service6_mask", "224"), ("src6", "352")]
    m = re.search(r"STRUCT 'rr_encap_endpoint' size=(\d+) vlen=1\n\t'ipv4' type_id=\d+ bits_offset=0", btf)
    assert m is not None and int(m.group(1)) == ENDPOINT.size and ENDPOINT_KEY.size == 16
    header = (BPF_DIR / "router_encap.h").read_text()
    enum = re.findall(r"RR_ENCAP_(\w+) = (\d+),", header)
    assert enum[:-1] == [(name, str(i)) for i, name in enumerate(
        ["OK", "NO_ROUTE", "NO_NEIGH", "NO_GATEWAY", "ROOM_FAIL", "OK_WIRE", "OK_WIRE_IPV6", "OUTER_IPV6"])]
    assert enum[-1] == ("STATS", str(len(STATS)))
    assert STATS == ("encapsulated", "no_route", "no_neigh", "no_gateway", "room_fail", "encapsulated_wire",
                     "encapsulated_wire_ipv6", "outer_ipv6")
    source = (BPF_DIR / "router_encap.c").read_text()
    assert all(f"}} {name} SEC(\".maps\");" in source for name in MAPS)


def test_encap_config_round_trips() -> None:
    config = EncapConfig(IPv4Network("10.1.0.0/24"), IPv4Address("192.168.137.1"), IPv6Network("2001:db8:1::/64"),
                         IPv6Address("2001:db8:137::1"))
    raw = config.pack()
    assert raw[:12] == bytes([10, 1, 0, 0, 255, 255, 255, 0, 192, 168, 137, 1])
    assert raw[12:28] == IPv6Address("2001:db8:1::").packed and raw[28:44] == bytes([255] * 8 + [0] * 8)
    assert EncapConfig.unpack(raw) == config


def test_bird_config_has_a_session_per_balancer_and_merges_paths(tmp_path: Path) -> None:
    peers = [Peer("lb1", "192.168.137.11", 65001), Peer("lb2", "192.168.137.12", 65001)]
    families = [Family("ipv4", "10.1.0.0/24", 1476), Family("ipv6", "2001:db8:1::/64", 1456)]
    text = render_config("192.168.137.1", 65000, peers, families, tmp_path / "static", tmp_path / "bird.log")
    assert "protocol bgp lb1 from balancer { neighbor 192.168.137.11 as 65001; }" in text
    assert "protocol bgp lb2 from balancer { neighbor 192.168.137.12 as 65001; }" in text
    assert "merge paths on;" in text and "hold time 3;" in text
    assert "krt_mtu = 1476;" in text and "krt_mtu = 1456;" in text  # each family's tunnel header
    # Only routes inside the VIPs' prefixes are taken, each family over the one (IPv4) session.
    assert "net ~ [ 10.1.0.0/24{24,32} ]" in text and "net ~ [ 2001:db8:1::/64{64,128} ]" in text
    assert "  ipv6 { import filter ipv6_vips; export none; };" in text
    assert render_static([StaticRoute("10.1.0.0/24", ("192.168.137.21", "192.168.137.22")),
                          StaticRoute("10.1.0.0/24", ())]) == "route 10.1.0.0/24 via 192.168.137.21 via 192.168.137.22;\n"
    if shutil.which("bird"):  # BIRD itself parses it (-p: parse only)
        (tmp_path / "static.ipv6").write_text("")
        (tmp_path / "static.ipv4").write_text("")
        (tmp_path / "bird.conf").write_text(text)
        subprocess.run(["bird", "-p", "-c", str(tmp_path / "bird.conf")], check=True, capture_output=True)


def test_bird_socket_reads_numbered_replies(tmp_path: Path) -> None:
    """BIRD's reply format: code-dash continues, code-space ends, a leading space continues a code;
    8xxx/9xxx are errors."""
    path = tmp_path / "bird.ctl"
    replies = {b"show status\n": b"1000-BIRD 2.0.12\n1011-Router ID is 1.1.1.1\n Current server time is now\n0013 Daemon is up\n",
               b"configure\n": b"0002-Reading configuration\n9001 syntax error, line 3\n"}
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        for _ in replies:
            conn, _ = server.accept()
            with conn, conn.makefile("rwb") as f:
                f.write(b"0001 BIRD 2.0.12 ready.\n")
                f.flush()
                f.write(replies[f.readline()])
                f.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    sock = BirdSocket(path)
    assert sock.command("show status") == ["BIRD 2.0.12", "Router ID is 1.1.1.1", "Current server time is now",
                                           "Daemon is up"]
    with pytest.raises(BirdError, match="9001 Reading configuration / syntax error, line 3"):
        sock.command("configure")
    thread.join(5)
    server.close()


def test_tunnel_mtus_leave_room_for_the_tunnel_and_never_exceed_the_clients_links() -> None:
    from rusty_rail.lab.topology import tunnel_mtus

    assert tunnel_mtus() == (1476, 1456)
    assert tunnel_mtus(1524) == (1500, 1480)  # Lab(core_mtu=1524): the clients' path is 1500 bytes
    assert tunnel_mtus(9000) == (1500, 1500)
