"""Count what crosses a lab device, to prove where packets are (and are not) GRE-encapsulated.

An AF_PACKET socket is opened inside the namespace (pyroute2 creates it there and hands it back)
before the traffic starts, and drained, without blocking, after it ends: the kernel queues the
frames in between, so nothing has to wait or sleep. AF_PACKET sees frames before tc ingress, so on a
server it sees the GRE as it arrived, before the decap program strips it.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from dataclasses import dataclass

from pyroute2 import netns as _netns

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


@dataclass(frozen=True)
class Frame:
    outgoing: bool
    proto: int  # outer IPv4 protocol or IPv6 next header (47 = GRE, 6 = TCP)
    src: str
    dst: str
    inner: tuple[int, str, str] | None  # (proto, src, dst) inside GRE, of either family
    inner_ports: tuple[int, int] | None = None  # (sport, dport) of inner TCP/UDP, when present
    version: int = 4  # the outer IP version

    @property
    def inner_version(self) -> int | None:
        return None if self.inner is None else (6 if ":" in self.inner[1] else 4)


def _ip(data: bytes, at: int) -> tuple[int, str, str, int] | None:
    """(protocol, src, dst, transport offset) of the IPv4 or IPv6 header at `at` (IPv6: the fixed
    header's next header; extension headers are not walked), or None when there is none."""
    version = data[at] >> 4 if len(data) > at else 0
    if version == 4 and len(data) >= at + 20:
        return data[at + 9], socket.inet_ntoa(data[at + 12:at + 16]), socket.inet_ntoa(data[at + 16:at + 20]), \
            at + (data[at] & 0x0F) * 4
    if version == 6 and len(data) >= at + 40:
        return (data[at + 6], socket.inet_ntop(socket.AF_INET6, data[at + 8:at + 24]),
                socket.inet_ntop(socket.AF_INET6, data[at + 24:at + 40]), at + 40)
    return None


def _parse(frame: bytes, pkttype: int) -> Frame | None:
    if frame[12:14] not in (b"\x08\x00", b"\x86\xdd") or (outer := _ip(frame, 14)) is None:
        return None
    proto, src, dst, gre = outer
    inner = ports = None
    if proto == 47 and len(frame) >= gre + 4:
        flags = struct.unpack("!H", frame[gre:gre + 2])[0]
        found = _ip(frame, gre + 4 + 4 * bin(flags & 0xB000).count("1"))
        if found is not None:
            inner = found[:3]
            l4 = found[3]
            if inner[0] in (6, 17) and len(frame) >= l4 + 4:
                ports = struct.unpack("!HH", frame[l4:l4 + 4])
    return Frame(pkttype == PACKET_OUTGOING, proto, src, dst, inner, ports, frame[14] >> 4)


class Sniffer:
    """with Sniffer(ns, "eth0") as s: <traffic>; frames = s.frames()"""

    def __init__(self, ns: str, device: str, bufsize: int = 8 << 20) -> None:
        self._sock = _netns.create_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        # SO_RCVBUFFORCE: rmem_max cannot be raised inside a namespace, and we are root.
        self._sock.setsockopt(socket.SOL_SOCKET, 33, bufsize)  # SO_RCVBUFFORCE
        self._sock.bind((device, 0))
        self._sock.setblocking(False)

    def frames(self) -> list[Frame]:
        out: list[Frame] = []
        while True:
            try:
                data, addr = self._sock.recvfrom(65535)
            except BlockingIOError:
                return out
            f = _parse(data, addr[2])
            if f is not None:
                out.append(f)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Sniffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def summary(frames: list[Frame]) -> Counter[str]:
    return Counter(f"{'out' if f.outgoing else 'in'} {f.proto}" for f in frames)
