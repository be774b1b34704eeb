"""Flow keys: which packets belong together (docs/WIRE.md section 5).

A key is 16 bytes, `src | dst | sport | dport | proto | 0 0 0`, all in network order: the same bytes
are the connection table's dictionary key and the flow hash's input, so a packet's key is a few
slices, not an object.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from rusty_rail.core.ipv4 import IpProtocol

FLOW_KEY_LEN = 16
_PAD = b"\x00\x00\x00"
_NO_PORTS = b"\x00\x00\x00\x00"
_ICMP_ERROR_TYPES = frozenset((3, 11, 12))  # unreachable (incl. frag needed), time exceeded, parameter problem
_TCP, _UDP, _ICMP = int(IpProtocol.TCP), int(IpProtocol.UDP), int(IpProtocol.ICMP)


@dataclass(frozen=True, slots=True)
class FlowKey:
    src: IPv4Address
    dst: IPv4Address
    protocol: int
    sport: int = 0
    dport: int = 0

    @property
    def packed(self) -> bytes:
        return self.src.packed + self.dst.packed + struct.pack("!HHB", self.sport, self.dport, self.protocol) + _PAD

    @classmethod
    def from_packed(cls, key: bytes) -> FlowKey:
        sport, dport, proto = struct.unpack_from("!HHB", key, 8)
        return cls(IPv4Address(key[0:4]), IPv4Address(key[4:8]), proto, sport, dport)

    def __str__(self) -> str:
        return f"{self.src}:{self.sport} -> {self.dst}:{self.dport} proto {self.protocol}"


def inner_flow_key(inner: bytes, ihl: int) -> bytes | None:
    """The key of an inner IPv4 packet whose version, IHL and total length were already checked.

    `inner` ends at the packet's total length. Returns None when a TCP/UDP packet that is not a
    fragment lacks its 4 port bytes (INNER_TRUNCATED). This is the hot path: slices, no objects.
    """
    proto = inner[9]
    frag = ((inner[6] << 8) | inner[7]) & 0x3FFF
    if frag:
        return inner[12:20] + _NO_PORTS + bytes((proto,)) + _PAD
    if proto == _TCP or proto == _UDP:
        if len(inner) < ihl + 4:
            return None
        return inner[12:20] + inner[ihl : ihl + 4] + bytes((proto,)) + _PAD
    if proto == _ICMP and len(inner) >= ihl + 8 + 20 and inner[ihl] in _ICMP_ERROR_TYPES:
        reversed_key = _embedded_reversed_key(inner, ihl + 8)
        if reversed_key is not None:
            return reversed_key
    return inner[12:20] + _NO_PORTS + bytes((proto,)) + _PAD


def _embedded_reversed_key(inner: bytes, at: int) -> bytes | None:
    """The key of the flow an ICMP error is about: its embedded header, source and destination swapped."""
    vihl = inner[at]
    emb_ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or emb_ihl < 20 or len(inner) < at + emb_ihl:
        return None
    emb_proto = inner[at + 9]
    swapped = inner[at + 16 : at + 20] + inner[at + 12 : at + 16]
    emb_frag = ((inner[at + 6] << 8) | inner[at + 7]) & 0x3FFF
    ports_at = at + emb_ihl
    if (emb_proto == _TCP or emb_proto == _UDP) and not emb_frag and len(inner) >= ports_at + 4:
        return swapped + inner[ports_at + 2 : ports_at + 4] + inner[ports_at : ports_at + 2] + bytes((emb_proto,)) + _PAD
    return swapped + _NO_PORTS + bytes((emb_proto,)) + _PAD
