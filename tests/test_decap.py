"""`rusty-rail decap`: attach, status (the kernel's program id), detach, and GRE through a veth decapsulated
(GRE over IPv4 or IPv6, carrying IPv4 or IPv6).

The server side is the veth fixture's "lb" namespace (lb0, 10.77.0.1) holding a VIP on lo; the peer sends
GRE at it from an AF_PACKET socket. Without the program the server's kernel (no GRE module) answers GRE
with ICMP protocol unreachable; with it, the inner UDP datagram reaches a socket bound to the VIP.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest

from rusty_rail import decap
from rusty_rail.bpf import libbpf, tc
from rusty_rail.bpf.build import object_path
from tests.engine_netns import VethPair, checksum, drain, gre_frame, ipv4, ipv6, is_icmp_protocol_unreachable, pending, udp

pytestmark = pytest.mark.netns

VIP = "10.1.0.1"
CLIENT = "10.0.0.1"
PORT = 9999


def _kernel_tc_ids(pair: VethPair) -> list[int]:
    """Program ids on lb0's tc hooks, as bpftool (not our code) reads them from the kernel."""
    out = pair.run(pair.lb_ns, "bpftool", "-j", "net", "show", "dev", pair.lb_dev).stdout
    return [entry["id"] for dev in json.loads(out) for entry in dev["tc"]]


def _gre_with_key(pair: VethPair, inner: bytes) -> bytes:
    """GRE with the K bit and a 4-byte key (RFC 2890): the program must skip the option."""
    gre = b"\x20\x00\x08\x00" + (0x01020304).to_bytes(4, "big")
    return pair.lb_mac + pair.peer_mac + b"\x08\x00" + ipv4(pair.peer_ip, pair.lb_ip, 47, gre + inner)


@pytest.fixture
def server(veth: VethPair) -> VethPair:
    veth.ip(veth.lb_ns, "addr", "add", f"{VIP}/32", "dev", "lo")
    # The inner source arrives on lb0 with no route back through it: no reverse-path filter.
    veth.run(veth.lb_ns, "sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=0",
             f"net.ipv4.conf.{veth.lb_dev}.rp_filter=0")
    return veth


@pytest.mark.skipif(shutil.which("bpftool") is None, reason="needs bpftool")
def test_attach_status_detach_and_gre_decapsulated(server: VethPair, capsys: pytest.CaptureFixture[str]) -> None:
    pair = server
    with pair.inside(pair.lb_ns):
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    app.bind((VIP, PORT))
    app.settimeout(5)
    peer = pair.peer_packet_socket()
    inner = ipv4(CLIENT, VIP, 17, udp(1234, PORT, b"through gre"))
    frame = gre_frame(pair.lb_mac, pair.peer_mac, pair.peer_ip, pair.lb_ip, inner)
    try:
        assert decap.status(pair.lb_dev, pair.lb_ns) == decap.DecapStatus(pair.lb_dev, False, None)
        peer.send(frame)  # no decap: the kernel has no GRE, and says so
        drain(peer, is_icmp_protocol_unreachable, 1)
        assert _pending_datagrams(app) == []

        st = decap.attach(pair.lb_dev, pair.lb_ns)
        assert st.attached and st.program_id is not None
        assert _kernel_tc_ids(pair) == [st.program_id]
        assert decap.main(["--netns", pair.lb_ns, "--device", pair.lb_dev, "status"]) == 0
        assert capsys.readouterr().out == f"{pair.lb_dev}: GRE decap attached (prog id {st.program_id})\n"

        for f in (frame, _gre_with_key(pair, inner)):
            peer.send(f)
            data, source = app.recvfrom(2048)
            assert (data, source) == (b"through gre", (CLIENT, 1234))
        assert pending(peer, is_icmp_protocol_unreachable) == []

        again = decap.attach(pair.lb_dev, pair.lb_ns)  # replaces: still one filter
        assert again.attached and _kernel_tc_ids(pair) == [again.program_id]

        assert decap.main(["--netns", pair.lb_ns, "--device", pair.lb_dev, "detach"]) == 0
        assert capsys.readouterr().out == f"{pair.lb_dev}: GRE decap not attached\n"
        assert _kernel_tc_ids(pair) == []
        peer.send(frame)
        drain(peer, is_icmp_protocol_unreachable, 1)
        assert _pending_datagrams(app) == []
        assert decap.detach(pair.lb_dev, pair.lb_ns).attached is False  # idempotent
    finally:
        app.close()
        peer.close()


VIP6, CLIENT6 = "2001:db8:1::1", "2001:db8:c::1"


def udp6(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """IPv6 UDP with its checksum (RFC 8200 8.1: mandatory over IPv6, the receiving stack checks it)."""
    length = 8 + len(payload)
    pseudo = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + length.to_bytes(4, "big")
    header = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + length.to_bytes(2, "big")
    check = checksum(pseudo + b"\0\0\0\x11" + header + b"\0\0" + payload) or 0xFFFF
    return ipv6(src, dst, 17, header + check.to_bytes(2, "big") + payload)


@pytest.mark.parametrize(("outer", "inner"), [("ipv4", "ipv6"), ("ipv6", "ipv4"), ("ipv6", "ipv6")])
def test_either_outer_family_carries_either_inner_family(server: VethPair, outer: str, inner: str) -> None:
    """GRE over IPv6 (no ip6_gre module either) and across families: the inner packet reaches the VIP of
    its own family, the skb's protocol and the Ethernet type switched where the families differ."""
    pair = server
    pair.add_ipv6()
    pair.ip(pair.lb_ns, "-6", "addr", "add", f"{VIP6}/128", "dev", "lo", "nodad")
    family = socket.AF_INET6 if inner == "ipv6" else socket.AF_INET
    with pair.inside(pair.lb_ns):
        app = socket.socket(family, socket.SOCK_DGRAM)
    app.bind((VIP6 if inner == "ipv6" else VIP, PORT))
    app.settimeout(5)
    peer = pair.peer_packet_socket()
    try:
        decap.attach(pair.lb_dev, pair.lb_ns)
        if inner == "ipv6":
            packet, client = udp6(CLIENT6, VIP6, 1234, PORT, b"through gre"), CLIENT6
        else:
            packet, client = ipv4(CLIENT, VIP, 17, udp(1234, PORT, b"through gre")), CLIENT
        outer_src, outer_dst = (pair.peer_ip, pair.lb_ip) if outer == "ipv4" else (pair.peer_ip6, pair.lb_ip6)
        peer.send(gre_frame(pair.lb_mac, pair.peer_mac, outer_src, outer_dst, packet))
        data, source = app.recvfrom(2048)
        assert (data, source[:2]) == (b"through gre", (client, 1234))
    finally:
        app.close()
        peer.close()


def _pending_datagrams(sock: socket.socket) -> list[bytes]:
    """What is already queued, without waiting (the caller's ICMP answer proves the packet was handled)."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    out = []
    try:
        while True:
            out.append(sock.recv(2048))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(timeout)


def test_other_filters_are_left_alone(server: VethPair, capsys: pytest.CaptureFixture[str]) -> None:
    """Only our filter (priority 49, handle 1) is ours: a filter elsewhere survives attach and detach,
    and a foreign program on our slot is reported, not counted as decap, and not removed."""
    pair = server
    with libbpf.BpfObject(str(object_path("router_encap"))) as obj:
        obj.load()
        foreign = obj.program("rr_router_encap").fd
        other = tc.attach(pair.lb_dev, foreign, tc.INGRESS, priority=7, netns=pair.lb_ns)
        decap.attach(pair.lb_dev, pair.lb_ns)
        decap.detach(pair.lb_dev, pair.lb_ns)
        assert tc.query(pair.lb_dev, tc.INGRESS, priority=7, netns=pair.lb_ns) == tc.TcProgram(other, "rr_router_encap")

        squatter = tc.attach(pair.lb_dev, foreign, tc.INGRESS, priority=decap.PRIORITY, netns=pair.lb_ns)
    st = decap.status(pair.lb_dev, pair.lb_ns)
    assert st == decap.DecapStatus(pair.lb_dev, False, squatter, "rr_router_encap")
    assert decap.main(["--netns", pair.lb_ns, "--device", pair.lb_dev, "detach"]) == 0
    assert "not attached (filter 49:1 runs 'rr_router_encap'" in capsys.readouterr().out
    assert tc.query(pair.lb_dev, tc.INGRESS, netns=pair.lb_ns) == tc.TcProgram(squatter, "rr_router_encap")
    assert tc.detach(pair.lb_dev, tc.INGRESS, netns=pair.lb_ns) is True
    assert tc.detach(pair.lb_dev, tc.INGRESS, netns=pair.lb_ns) is False


def test_errors_are_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    assert decap.main(["--netns", "rr-no-such-namespace", "--device", "eth0", "status"]) == 1
    assert "/run/netns/rr-no-such-namespace" in capsys.readouterr().err


def test_the_cli_entry_point(server: VethPair) -> None:
    """`rusty-rail decap ...` (here `python -m rusty_rail decap ...`) dispatches to this module."""
    r = subprocess.run([sys.executable, "-m", "rusty_rail", "decap", "--netns", server.lb_ns,
                        "--device", server.lb_dev, "status"], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, f"{server.lb_dev}: GRE decap not attached\n"), r.stderr
