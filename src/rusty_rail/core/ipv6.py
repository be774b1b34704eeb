"""IPv6 headers (RFC 8200): the fixed header (section 3), the extension headers the balancer walks
(section 4: hop-by-hop options 4.3, routing 4.4, fragment 4.5, destination options 4.6) and ICMPv6's
error types (RFC 4443).

For tests and tools, like ipv4.py: the per-packet path (core/flow.py inner6_flow_key) reads the same
bytes by offset, and the golden fixtures hold the two to one answer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv6Address

from rusty_rail.core.errors import ParseError

IPV6_HEADER_LEN = 40
EXTENSION_HEADER_LIMIT = 4
"""Extension headers walked before the transport header; a fifth is a drop (docs/WIRE.md 4b)."""
FRAGMENT_HEADER_LEN = 8
_FIXED = struct.Struct("!IHBB16s16s")
_FRAGMENT = struct.Struct("!BBHI")


class NextHeader(IntEnum):
    """The next-header values the balancer knows (IANA "Assigned Internet Protocol Numbers")."""

    HOP_BY_HOP = 0
    TCP = 6
    UDP = 17
    ROUTING = 43
    FRAGMENT = 44
    GRE = 47
    ICMPV6 = 58
    NO_NEXT_HEADER = 59
    DESTINATION_OPTIONS = 60


WALKED = frozenset((NextHeader.HOP_BY_HOP, NextHeader.ROUTING, NextHeader.FRAGMENT, NextHeader.DESTINATION_OPTIONS))
"""The extension headers docs/WIRE.md section 4b walks."""


class Icmpv6Error(IntEnum):
    """RFC 4443 section 3: the ICMPv6 error messages, whose body quotes the packet they are about."""

    DESTINATION_UNREACHABLE = 1
    PACKET_TOO_BIG = 2
    TIME_EXCEEDED = 3
    PARAMETER_PROBLEM = 4


@dataclass(frozen=True, slots=True)
class IPv6Header:
    """RFC 8200 section 3. `payload_length` is as parsed; build_ipv6 computes it."""

    src: IPv6Address
    dst: IPv6Address
    next_header: int
    traffic_class: int = 0
    flow_label: int = 0
    hop_limit: int = 64
    payload_length: int = 0


def parse_ipv6(data: bytes) -> tuple[IPv6Header, bytes]:
    """The fixed header and its payload (to the payload length; bytes after it are not the packet's)."""
    if len(data) < IPV6_HEADER_LEN:
        raise ParseError(f"ipv6: {len(data)} bytes, need {IPV6_HEADER_LEN}")
    first, length, next_header, hop_limit, src, dst = _FIXED.unpack_from(data)
    if first >> 28 != 6:
        raise ParseError(f"ipv6: version {first >> 28}")
    if IPV6_HEADER_LEN + length > len(data):
        raise ParseError(f"ipv6: payload length {length} with {len(data) - IPV6_HEADER_LEN} bytes after the header")
    header = IPv6Header(IPv6Address(src), IPv6Address(dst), next_header, (first >> 20) & 0xFF, first & 0xFFFFF,
                        hop_limit, length)
    return header, bytes(data[IPV6_HEADER_LEN : IPV6_HEADER_LEN + length])


def build_ipv6(header: IPv6Header, payload: bytes) -> bytes:
    """The fixed header (payload length computed) followed by `payload`."""
    if not 0 <= header.traffic_class <= 0xFF or not 0 <= header.flow_label <= 0xFFFFF:
        raise ParseError("ipv6: traffic class is 8 bits, flow label 20")
    if len(payload) > 0xFFFF:
        raise ParseError(f"ipv6: payload of {len(payload)} bytes needs a jumbogram (RFC 2675)")
    first = 6 << 28 | header.traffic_class << 20 | header.flow_label
    return _FIXED.pack(first, len(payload), header.next_header, header.hop_limit, header.src.packed,
                       header.dst.packed) + payload


@dataclass(frozen=True, slots=True)
class OptionsHeader:
    """Hop-by-hop options, routing or destination options (RFC 8200 4.3, 4.4, 4.6): a next header, a
    length in 8-byte units not counting the first 8, and a body (options or routing data) we do not read."""

    kind: int
    """NextHeader.HOP_BY_HOP, ROUTING or DESTINATION_OPTIONS: what the previous header called it."""
    next_header: int
    body: bytes = b"\x00" * 6
    """Everything after the first two bytes: 6 + 8·n bytes."""


@dataclass(frozen=True, slots=True)
class FragmentHeader:
    """RFC 8200 4.5. `offset` in 8-byte units; `more` is the M flag."""

    next_header: int
    offset: int = 0
    more: bool = False
    identification: int = 0

    @property
    def is_fragment(self) -> bool:
        """False for an atomic fragment (offset 0, M clear: RFC 6946), which is a whole packet."""
        return self.offset != 0 or self.more


ExtensionHeader = OptionsHeader | FragmentHeader


def parse_extension_headers(next_header: int, payload: bytes,
                            limit: int = EXTENSION_HEADER_LIMIT) -> tuple[list[ExtensionHeader], int, int]:
    """Walk the headers of WALKED from `next_header` over an IPv6 payload: (the headers, the next header
    the walk ended on, the offset of what follows in `payload`). The walk stops after a fragment header
    of a fragment (its transport header may be elsewhere). ParseError for a header cut short or more
    than `limit` headers: docs/WIRE.md's INNER_EXT_HEADERS."""
    headers: list[ExtensionHeader] = []
    at = 0
    while next_header in WALKED:
        if len(headers) == limit:
            raise ParseError(f"ipv6: more than {limit} extension headers")
        if next_header == NextHeader.FRAGMENT:
            if at + FRAGMENT_HEADER_LEN > len(payload):
                raise ParseError(f"ipv6: fragment header cut short at {at}")
            nh, _, word, ident = _FRAGMENT.unpack_from(payload, at)
            fragment = FragmentHeader(nh, word >> 3, bool(word & 1), ident)
            headers.append(fragment)
            next_header, at = nh, at + FRAGMENT_HEADER_LEN
            if fragment.is_fragment:
                break
            continue
        if at + 2 > len(payload):
            raise ParseError(f"ipv6: extension header {next_header} cut short at {at}")
        length = (payload[at + 1] + 1) * 8
        if at + length > len(payload):
            raise ParseError(f"ipv6: extension header {next_header} of {length} bytes cut short at {at}")
        headers.append(OptionsHeader(next_header, payload[at], bytes(payload[at + 2 : at + length])))
        next_header, at = payload[at], at + length
    return headers, next_header, at


def build_extension_header(header: ExtensionHeader) -> bytes:
    """One extension header's bytes (the inverse of one step of parse_extension_headers)."""
    if isinstance(header, FragmentHeader):
        if not 0 <= header.offset < 1 << 13:
            raise ParseError("ipv6: fragment offset is 13 bits")
        return _FRAGMENT.pack(header.next_header, 0, header.offset << 3 | int(header.more), header.identification)
    if len(header.body) < 6 or (len(header.body) - 6) % 8 or len(header.body) > 6 + 8 * 255:
        raise ParseError("ipv6: an options header's body is 6 + 8·n bytes (n <= 255)")
    return bytes((header.next_header, (len(header.body) - 6) // 8)) + header.body
