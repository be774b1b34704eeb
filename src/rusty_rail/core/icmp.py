"""ICMP (RFC 792) and ICMPv6 (RFC 4443) messages, and the balancer's own answers built from them.

`parse_icmp` / `build_icmp` are the 8-byte header both protocols share (type, code, checksum, 4 bytes
whose meaning the type gives) and the body after it. The answers (docs/WIRE.md section 11) are IP packets
to the client, from the address it wrote to (the VIP), sent back toward the router as plain IP:

- `echo_reply` / `echo_reply6`: the request's ICMP message with the type changed and the checksum
  adjusted for that one word (RFC 1624 eqn. 3), as Katran does; a new IP header (no options, no
  extension headers).
- `too_big` / `too_big6`: "fragmentation needed" (type 3 code 4, RFC 792, with the next-hop MTU of RFC
  1191 section 4) or "packet too big" (type 2, RFC 4443 3.2; RFC 8201) carrying the usable MTU and the
  first bytes of the packet that did not fit: QUOTE4 (the IPv4 answer stays within 576 bytes, RFC 1812
  4.3.2.3) or QUOTE6 (within the IPv6 minimum MTU, 1280, RFC 4443 2.4(c)). The client's TCP matches the
  answer to its connection by the quoted addresses, ports and sequence number, so the quote is the
  packet as the client sent it.

These run per packet on the AF_PACKET engine's answer path: offsets and struct, not dataclasses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from rusty_rail.core.checksum import internet_checksum
from rusty_rail.core.errors import ParseError

__all__ = ["IcmpHeader", "IcmpType", "Icmpv6Type", "QUOTE4", "QUOTE6", "build_icmp", "echo_reply",
           "echo_reply6", "parse_icmp", "too_big", "too_big6"]

ICMP_HEADER_LEN = 8
QUOTE4 = 576 - 20 - ICMP_HEADER_LEN
"""Bytes of the too-big packet an IPv4 answer quotes (at most): 548, so the answer is 576 bytes."""
QUOTE6 = 1280 - 40 - ICMP_HEADER_LEN
"""Bytes an ICMPv6 packet-too-big quotes (at most): 1232, so the answer fits the IPv6 minimum MTU."""
ANSWER_TTL = 64
TOO_BIG_TOS = 0xC0
"""IP precedence "internetwork control" (RFC 791), as Linux marks the ICMP errors it sends."""
_ICMPV6 = 58
_ICMP = 1
_IP_DF = 0x4000


class IcmpType(IntEnum):
    ECHO_REPLY = 0
    DEST_UNREACHABLE = 3
    ECHO_REQUEST = 8


FRAGMENTATION_NEEDED = 4
"""The code of "destination unreachable" that carries a next-hop MTU (RFC 1191 section 4)."""
ICMP_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))
"""Unreachable, source quench, redirect, time exceeded, parameter problem: no error is sent about these
(RFC 1122 3.2.2)."""


class Icmpv6Type(IntEnum):
    PACKET_TOO_BIG = 2
    ECHO_REQUEST = 128
    ECHO_REPLY = 129


@dataclass(frozen=True)
class IcmpHeader:
    """RFC 792 / RFC 4443 section 2.1: type, code, checksum, and 4 bytes the type defines (an echo's
    identifier and sequence number, "fragmentation needed"'s unused and next-hop MTU (RFC 1191),
    "packet too big"'s MTU)."""

    type: int
    code: int
    checksum: int
    rest: int


_HEADER = struct.Struct("!BBHI")


def parse_icmp(data: bytes) -> tuple[IcmpHeader, bytes]:
    """The header and the body; ParseError when there are fewer than 8 bytes."""
    if len(data) < ICMP_HEADER_LEN:
        raise ParseError(f"ICMP message of {len(data)} bytes (at least {ICMP_HEADER_LEN})")
    return IcmpHeader(*_HEADER.unpack_from(data)), bytes(data[ICMP_HEADER_LEN:])


def build_icmp(header: IcmpHeader, body: bytes, pseudo_header: bytes = b"") -> bytes:
    """The message with its checksum computed over it (ICMP) or over `pseudo_header` and it (ICMPv6:
    RFC 4443 2.3 with RFC 8200 8.1's pseudo-header); `header.checksum` is ignored."""
    raw = _HEADER.pack(header.type, header.code, 0, header.rest) + body
    checksum = internet_checksum(pseudo_header + raw)
    return raw[:2] + checksum.to_bytes(2, "big") + raw[4:]


def pseudo_header6(src: bytes, dst: bytes, length: int, next_header: int = _ICMPV6) -> bytes:
    """RFC 8200 section 8.1: source, destination, upper-layer length (32 bits), 3 zero bytes, next header."""
    return src + dst + struct.pack("!I3xB", length, next_header)


def _adjusted(checksum: int, old_word: int, new_word: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for one changed 16-bit word."""
    total = (~checksum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4_header(tos: int, total: int, src: bytes, dst: bytes) -> bytes:
    """IPv4 without options: ID 0 and DF (an atomic datagram, RFC 6864), TTL 64, protocol ICMP."""
    header = struct.pack("!BBHHHBBH", 0x45, tos, total, 0, _IP_DF, ANSWER_TTL, _ICMP, 0) + src + dst
    return header[:10] + internet_checksum(header).to_bytes(2, "big") + header[12:]


def _ipv6_header(payload_len: int, src: bytes, dst: bytes) -> bytes:
    """IPv6: traffic class 0, flow label 0, next header ICMPv6, hop limit 64."""
    return struct.pack("!IHBB", 0x60000000, payload_len, _ICMPV6, ANSWER_TTL) + src + dst


def echo_request_at(inner: bytes, ihl: int) -> bool:
    """Is this inner IPv4 packet (already checked: version, IHL, total length; `inner` ends at it) an
    echo request the balancer can answer: ICMP type 8, not a fragment, its 8-byte header present."""
    return (inner[9] == _ICMP and not ((inner[6] << 8) | inner[7]) & 0x3FFF and len(inner) >= ihl + 8
            and inner[ihl] == IcmpType.ECHO_REQUEST)


def echo_request6_at(inner: bytes) -> bool:
    """The same for an inner IPv6 packet: ICMPv6 right after the fixed header (no extension headers),
    type 128, its 8-byte header present."""
    return inner[6] == _ICMPV6 and len(inner) >= 48 and inner[40] == Icmpv6Type.ECHO_REQUEST


def echo_reply(inner: bytes, ihl: int) -> bytes:
    """The IPv4 echo reply to `inner` (an echo request: echo_request_at): from its destination to its
    source, the TOS kept, the ICMP message as it came with type 0 and the checksum adjusted."""
    message = inner[ihl:]
    checksum = _adjusted((message[2] << 8) | message[3], IcmpType.ECHO_REQUEST << 8 | message[1], message[1])
    body = bytes((IcmpType.ECHO_REPLY, message[1])) + checksum.to_bytes(2, "big") + message[4:]
    return _ipv4_header(inner[1], 20 + len(body), inner[16:20], inner[12:16]) + body


def echo_reply6(inner: bytes) -> bytes:
    """The ICMPv6 echo reply to `inner` (echo_request6_at): addresses swapped (the pseudo-header's sum does
    not change), type 129, the checksum adjusted for the type."""
    message = inner[40:]
    old = Icmpv6Type.ECHO_REQUEST << 8 | message[1]
    checksum = _adjusted((message[2] << 8) | message[3], old, Icmpv6Type.ECHO_REPLY << 8 | message[1])
    body = bytes((Icmpv6Type.ECHO_REPLY, message[1])) + checksum.to_bytes(2, "big") + message[4:]
    return _ipv6_header(len(body), inner[24:40], inner[8:24]) + body


def answers_too_big(inner: bytes, ihl: int) -> bool:
    """May an IPv4 packet too big for the path be answered: DF set, not a later fragment, not itself an
    ICMP error (RFC 1122 3.2.2). Otherwise it is dropped (OUTPUT_TOO_BIG)."""
    flags = (inner[6] << 8) | inner[7]
    if not flags & _IP_DF or flags & 0x1FFF:
        return False
    return not (inner[9] == _ICMP and inner[ihl] in ICMP_ERROR_TYPES)


def answers_too_big6(inner: bytes) -> bool:
    """The same for IPv6 (always "don't fragment": RFC 8200 5): not an ICMPv6 error (type < 128, RFC 4443
    2.4(e)) right after the fixed header."""
    return not (inner[6] == _ICMPV6 and inner[40] < 128)


def too_big(inner: bytes, mtu: int) -> bytes:
    """ICMP "fragmentation needed" about `inner` (an IPv4 packet, to its total length) with next-hop MTU
    `mtu`, from its destination to its source, quoting its first QUOTE4 bytes."""
    quote = inner[:QUOTE4]
    message = build_icmp(IcmpHeader(IcmpType.DEST_UNREACHABLE, FRAGMENTATION_NEEDED, 0, mtu & 0xFFFF), quote)
    return _ipv4_header(TOO_BIG_TOS, 20 + len(message), inner[16:20], inner[12:16]) + message


def too_big6(inner: bytes, mtu: int) -> bytes:
    """ICMPv6 "packet too big" about `inner` (an IPv6 packet, to 40 + its payload length) with `mtu`,
    from its destination to its source, quoting its first QUOTE6 bytes."""
    quote = inner[:QUOTE6]
    src, dst = inner[24:40], inner[8:24]
    length = ICMP_HEADER_LEN + len(quote)
    message = build_icmp(IcmpHeader(Icmpv6Type.PACKET_TOO_BIG, 0, 0, mtu), quote, pseudo_header6(src, dst, length))
    return _ipv6_header(length, src, dst) + message

