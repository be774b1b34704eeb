"""Flow keys: which packets belong together (docs/WIRE.md sections 5 and 6).

A key is `src | dst | sport | dport | proto | 0 0 0`, all in network order: 16 bytes for an IPv4 flow,
40 for an IPv6 one. The same bytes are the connection table's dictionary key and the flow hash's input,
so a packet's key is a few slices, not an object; the two lengths keep the families apart, and the
protocol is the 4th byte from the end of either.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from rusty_rail.core.address import Address, with_port
from rusty_rail.core.ipv4 import IpProtocol
from rusty_rail.core.ipv6 import EXTENSION_HEADER_LIMIT
from rusty_rail.core.verdict import DropReason

FLOW_KEY_LEN = 16
FLOW_KEY6_LEN = 40
PROTOCOL_FROM_END = 4
"""key[-PROTOCOL_FROM_END] is the protocol byte of a key of either family."""
_PAD = b"\x00\x00\x00"
_NO_PORTS = b"\x00\x00\x00\x00"
_ICMP_ERROR_TYPES = frozenset((3, 11, 12))  # unreachable (incl. frag needed), time exceeded, parameter problem
_TCP, _UDP, _ICMP = int(IpProtocol.TCP), int(IpProtocol.UDP), int(IpProtocol.ICMP)
_ICMPV6 = 58
_PROTOCOL_BYTES = tuple(bytes((p,)) + _PAD for p in range(256))


@dataclass(frozen=True, slots=True)
class FlowKey:
    src: Address
    dst: Address
    """Of the same family as `src`."""
    protocol: int
    sport: int = 0
    dport: int = 0

    def __post_init__(self) -> None:
        if self.src.version != self.dst.version:
            raise ValueError(f"a flow from {self.src} to {self.dst} mixes address families")

    @property
    def packed(self) -> bytes:
        return self.src.packed + self.dst.packed + struct.pack("!HHB", self.sport, self.dport, self.protocol) + _PAD

    @classmethod
    def from_packed(cls, key: bytes) -> FlowKey:
        if len(key) not in (FLOW_KEY_LEN, FLOW_KEY6_LEN):
            raise ValueError(f"a flow key is {FLOW_KEY_LEN} or {FLOW_KEY6_LEN} bytes, not {len(key)}")
        size = (len(key) - 8) // 2
        make = IPv4Address if size == 4 else IPv6Address
        sport, dport, proto = struct.unpack_from("!HHB", key, 2 * size)
        return cls(make(key[0:size]), make(key[size : 2 * size]), proto, sport, dport)

    def __str__(self) -> str:
        return f"{with_port(self.src, self.sport)} -> {with_port(self.dst, self.dport)} proto {self.protocol}"


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


def inner6_flow_key(inner: bytes) -> bytes | DropReason:
    """The key of an inner IPv6 packet whose version and payload length were already checked (docs/WIRE.md
    sections 4b and 5), or the reason to drop it: INNER_EXT_HEADERS, or INNER_TRUNCATED for TCP/UDP that
    is not a fragment and lacks its 4 port bytes.

    `inner` ends at 40 + payload length. The per-packet path reads bytes by offset, like inner_flow_key;
    core/ipv6.py's parse_extension_headers is the same walk as a codec."""
    n = len(inner)
    nh = inner[6]
    at = 40
    for _ in range(EXTENSION_HEADER_LIMIT):
        if nh == 0 or nh == 43 or nh == 60:  # hop-by-hop, routing, destination options
            if at + 2 > n:
                return DropReason.INNER_EXT_HEADERS
            end = at + (inner[at + 1] + 1) * 8
            if end > n:
                return DropReason.INNER_EXT_HEADERS
            nh, at = inner[at], end
        elif nh == 44:  # fragment
            if at + 8 > n:
                return DropReason.INNER_EXT_HEADERS
            if ((inner[at + 2] << 8) | inner[at + 3]) & 0xFFF9:  # offset != 0 or M: a fragment
                return inner[8:40] + _NO_PORTS + _PROTOCOL_BYTES[inner[at]]
            nh, at = inner[at], at + 8  # an atomic fragment (RFC 6946): a whole packet
        else:
            break
    if nh == 0 or nh == 43 or nh == 60 or nh == 44:  # a fifth extension header
        return DropReason.INNER_EXT_HEADERS
    if nh == _TCP or nh == _UDP:
        if at + 4 > n:
            return DropReason.INNER_TRUNCATED
        return inner[8:40] + inner[at : at + 4] + _PROTOCOL_BYTES[nh]
    if nh == _ICMPV6 and n >= at + 48 and 1 <= inner[at] <= 4 and inner[at + 8] >> 4 == 6:
        # An ICMPv6 error (RFC 4443: unreachable, too big, time exceeded, parameter problem) follows the
        # flow it quotes, reversed; the quoted packet's own extension headers are not walked.
        emb = at + 8
        emb_nh = inner[emb + 6]
        swapped = inner[emb + 24 : emb + 40] + inner[emb + 8 : emb + 24]
        if (emb_nh == _TCP or emb_nh == _UDP) and n >= emb + 44:
            return swapped + inner[emb + 42 : emb + 44] + inner[emb + 40 : emb + 42] + _PROTOCOL_BYTES[emb_nh]
        return swapped + _NO_PORTS + _PROTOCOL_BYTES[emb_nh]
    return inner[8:40] + _NO_PORTS + _PROTOCOL_BYTES[nh]
