"""IPv4 headers (RFC 791), with the header checksum of RFC 1071 computed in software."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from ipaddress import IPv4Address

from rusty_rail.core.checksum import checksum_ok, internet_checksum
from rusty_rail.core.errors import ParseError

IPV4_MIN_HEADER_LEN = 20
_FIXED = struct.Struct("!BBHHHBBH4s4s")


class IpProtocol(IntEnum):
    ICMP = 1
    TCP = 6
    UDP = 17
    GRE = 47


class FragmentFlags(IntFlag):
    """The flags field's bits, as they sit in the 16-bit flags/fragment-offset word."""

    MF = 0x2000
    DF = 0x4000


FRAGMENT_OFFSET_MASK = 0x1FFF


@dataclass(frozen=True, slots=True)
class IPv4Header:
    src: IPv4Address
    dst: IPv4Address
    protocol: int
    tos: int = 0
    identification: int = 0
    flags: FragmentFlags = FragmentFlags(0)
    fragment_offset: int = 0
    ttl: int = 64
    options: bytes = b""
    total_length: int = 0
    checksum: int = 0

    @property
    def header_length(self) -> int:
        return IPV4_MIN_HEADER_LEN + len(self.options)

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags & FragmentFlags.MF) or self.fragment_offset != 0


def parse_ipv4(data: bytes, verify_checksum: bool = True) -> tuple[IPv4Header, bytes]:
    """Parse one IPv4 packet into its header and payload (the payload ends at the total length)."""
    if len(data) < IPV4_MIN_HEADER_LEN:
        raise ParseError(f"ipv4: {len(data)} bytes, need {IPV4_MIN_HEADER_LEN}")
    vihl, tos, total, ident, frag, ttl, proto, csum, src, dst = _FIXED.unpack_from(data)
    if vihl >> 4 != 4:
        raise ParseError(f"ipv4: version {vihl >> 4}")
    ihl = (vihl & 0x0F) * 4
    if ihl < IPV4_MIN_HEADER_LEN:
        raise ParseError(f"ipv4: header length {ihl}")
    if total < ihl or total > len(data):
        raise ParseError(f"ipv4: total length {total} with header {ihl} and {len(data)} bytes")
    if verify_checksum and not checksum_ok(data[:ihl]):
        raise ParseError("ipv4: bad header checksum")
    header = IPv4Header(
        src=IPv4Address(src),
        dst=IPv4Address(dst),
        protocol=proto,
        tos=tos,
        identification=ident,
        flags=FragmentFlags(frag & 0x6000),
        fragment_offset=frag & FRAGMENT_OFFSET_MASK,
        ttl=ttl,
        options=bytes(data[IPV4_MIN_HEADER_LEN:ihl]),
        total_length=total,
        checksum=csum,
    )
    return header, bytes(data[ihl:total])


def build_ipv4(header: IPv4Header, payload: bytes) -> bytes:
    """The header (total length and checksum computed) followed by `payload`."""
    if len(header.options) % 4 or len(header.options) > 40:
        raise ParseError("ipv4: options must be a multiple of 4 bytes, at most 40")
    ihl = header.header_length
    total = ihl + len(payload)
    if total > 0xFFFF:
        raise ParseError(f"ipv4: total length {total} too large")
    fixed = _FIXED.pack(
        0x40 | ihl // 4,
        header.tos,
        total,
        header.identification,
        int(header.flags) | header.fragment_offset,
        header.ttl,
        header.protocol,
        0,
        header.src.packed,
        header.dst.packed,
    )
    raw = fixed + header.options
    csum = internet_checksum(raw)
    return raw[:10] + csum.to_bytes(2, "big") + raw[12:] + payload
