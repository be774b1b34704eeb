"""Two network namespaces joined by a veth pair, for the AF_PACKET engine tests.

    lb namespace:   veth "lb0"   10.77.0.1/24   (the engine runs here)
    peer namespace: veth "peer0" 10.77.0.2/24   (sends GRE in, captures what comes back)

`add_ipv6()` gives both ends an IPv6 address too (2001:db8:77::1/64 and ::2, without duplicate address
detection, so they are usable at once).

Names carry a random prefix so parallel runs never collide; `close()` removes both namespaces (and with
them the veth pair) even after a failure. Nothing here touches the host's own interfaces.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from pyroute2 import netns

T = TypeVar("T")

LB_IP = "10.77.0.1"
PEER_IP = "10.77.0.2"
LB_IP6 = "2001:db8:77::1"
PEER_IP6 = "2001:db8:77::2"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def wait_for(predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.01, what: str | None = None) -> T:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds.

    The sleep is a poll interval, not a synchronisation: the deadline is what bounds the wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or predicate!r}: not within {timeout}s (last: {value!r})")
        time.sleep(interval)


class VethPair:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.lb_ns = f"rre{tag}lb"
        self.peer_ns = f"rre{tag}pe"
        self.lb_dev = "lb0"
        self.peer_dev = "peer0"
        self.lb_ip = LB_IP
        self.peer_ip = PEER_IP
        try:
            sh("ip", "netns", "add", self.lb_ns)
            sh("ip", "netns", "add", self.peer_ns)
            sh("ip", "link", "add", self.lb_dev, "netns", self.lb_ns, "type", "veth",
               "peer", self.peer_dev, "netns", self.peer_ns)
            for ns, dev, ip in ((self.lb_ns, self.lb_dev, LB_IP), (self.peer_ns, self.peer_dev, PEER_IP)):
                self.ip(ns, "addr", "add", f"{ip}/24", "dev", dev)
                self.ip(ns, "link", "set", dev, "up")
                self.ip(ns, "link", "set", "lo", "up")
            self.lb_mac = bytes.fromhex(self.read(self.lb_ns, f"/sys/class/net/{self.lb_dev}/address").replace(":", ""))
            self.peer_mac = bytes.fromhex(
                self.read(self.peer_ns, f"/sys/class/net/{self.peer_dev}/address").replace(":", "")
            )
            self.lb_ifindex = int(self.read(self.lb_ns, f"/sys/class/net/{self.lb_dev}/ifindex"))
            self.peer_ifindex = int(self.read(self.peer_ns, f"/sys/class/net/{self.peer_dev}/ifindex"))
        except BaseException:
            self.close()
            raise

    def add_ipv6(self) -> None:
        """LB_IP6 and PEER_IP6 on the pair (nodad: no second of waiting for duplicate detection)."""
        for ns, dev, ip in ((self.lb_ns, self.lb_dev, LB_IP6), (self.peer_ns, self.peer_dev, PEER_IP6)):
            self.ip(ns, "-6", "addr", "add", f"{ip}/64", "dev", dev, "nodad")
        self.lb_ip6, self.peer_ip6 = LB_IP6, PEER_IP6

    @staticmethod
    def ip(ns: str, *args: str) -> str:
        return sh("ip", "-n", ns, *args).stdout

    @staticmethod
    def run(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *args, check=check)

    @staticmethod
    def read(ns: str, path: str) -> str:
        return sh("ip", "netns", "exec", ns, "cat", path).stdout.strip()

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """Sockets created inside this block belong to `ns` for their whole life."""
        netns.pushns(ns)
        try:
            yield
        finally:
            netns.popns()

    def peer_packet_socket(self) -> socket.socket:
        with self.inside(self.peer_ns):
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            s.setsockopt(263, 23, 1)  # PACKET_IGNORE_OUTGOING: not our own sends, only what comes back
            s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: tests send bursts before reading
            s.bind((self.peer_dev, 0x0003))
        s.settimeout(0.05)
        return s

    def close(self) -> None:
        for ns in (self.lb_ns, self.peer_ns):
            sh("ip", "netns", "del", ns, check=False)
        assert not any(ns in self._listnetns() for ns in (self.lb_ns, self.peer_ns))

    @staticmethod
    def _listnetns() -> list[str]:
        return os.listdir("/run/netns") if os.path.isdir("/run/netns") else []


# -- frames -----------------------------------------------------------------------------------------

def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 0) -> bytes:
    header = bytearray(
        bytes([0x45, 0]) + (20 + len(payload)).to_bytes(2, "big") + ident.to_bytes(2, "big") + b"\x40\x00"
        + bytes([64, proto]) + b"\0\0" + socket.inet_aton(src) + socket.inet_aton(dst)
    )
    header[10:12] = checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload


def ipv6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    """An IPv6 packet (RFC 8200 section 3): hop limit 64, no extension headers."""
    return (b"\x60\x00\x00\x00" + len(payload).to_bytes(2, "big") + bytes([nh, 64])
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + payload)


def tcp6(src: str, dst: str, sport: int, dport: int, payload: bytes = b"") -> bytes:
    """An IPv6 TCP segment (ACK, checksum left 0: these frames only test where packets go)."""
    header = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(8) + b"\x50\x10\xff\xff" + bytes(4)
    return ipv6(src, dst, 6, header + payload)


def gre_frame(dst_mac: bytes, src_mac: bytes, outer_src: str, outer_dst: str, inner: bytes) -> bytes:
    """Ethernet | IPv4 (protocol 47) or IPv6 (next header 47), by the outer addresses' family | GRE (no
    flags, protocol 0x0800 or 0x86DD by the inner packet's version) | inner packet."""
    gre = b"\x00\x00\x86\xdd" if inner[0] >> 4 == 6 else b"\x00\x00\x08\x00"
    if ":" in outer_src:
        return dst_mac + src_mac + b"\x86\xdd" + ipv6(outer_src, outer_dst, 47, gre + inner)
    return dst_mac + src_mac + b"\x08\x00" + ipv4(outer_src, outer_dst, 47, gre + inner)


def is_icmp_protocol_unreachable(frame: bytes) -> bool:
    return len(frame) >= 36 and frame[12:14] == b"\x08\x00" and frame[23] == 1 and frame[34] == 3 and frame[35] == 2


def drain(sock: socket.socket, predicate: Callable[[bytes], bool], count: int, timeout: float = 5.0) -> list[bytes]:
    """Receive until `count` frames matching `predicate` arrived (fails after `timeout`)."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"got {len(got)} of {count} frames in {timeout}s")
        try:
            frame = sock.recv(65536)
        except (TimeoutError, socket.timeout):
            continue
        if predicate(frame):
            got.append(frame)
    return got


def pending(sock: socket.socket, predicate: Callable[[bytes], bool]) -> list[bytes]:
    """Everything already queued on `sock` that matches (non-blocking)."""
    out: list[bytes] = []
    while True:
        try:
            frame = sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, TimeoutError, socket.timeout):
            return out
        if predicate(frame):
            out.append(frame)


def ping(pair: VethPair, ns: str, dst: str, timeout: float = 5.0) -> None:
    """One ICMP (or ICMPv6, for an IPv6 `dst`) echo from `ns` to `dst`, answered (raw socket: no ping
    binary needed; the kernel computes the ICMPv6 checksum, RFC 3542 3.1)."""
    six = ":" in dst
    with pair.inside(ns):
        if six:
            s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        ident = secrets.randbits(16)
        body = bytes([128 if six else 8, 0, 0, 0]) + ident.to_bytes(2, "big") + b"\x00\x01" + b"rusty-rail"
        if not six:
            body = body[:2] + checksum(body).to_bytes(2, "big") + body[4:]
        s.settimeout(0.1)
        s.sendto(body, (dst, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                packet = s.recv(2048)
            except (TimeoutError, socket.timeout):
                continue
            icmp = packet if six else packet[(packet[0] & 0x0F) * 4 :]  # raw IPv6 sockets omit the header
            if icmp[0] == (129 if six else 0) and icmp[4:6] == ident.to_bytes(2, "big"):
                return
        raise AssertionError(f"no echo reply from {dst}")
    finally:
        s.close()
