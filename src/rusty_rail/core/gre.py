"""GRE headers: RFC 2784 (base, checksum) with the key and sequence number of RFC 2890."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntFlag

from rusty_rail.core.checksum import checksum_ok, internet_checksum
from rusty_rail.core.errors import ParseError

GRE_BASE_LEN = 4
GRE_PROTO_IPV4 = 0x0800
GRE_PROTO_IPV6 = 0x86DD


class GreFlags(IntFlag):
    CHECKSUM = 0x8000  # C, RFC 2784 2.5
    ROUTING = 0x4000  # RFC 1701 only; RFC 2784 2.3 says discard
    KEY = 0x2000  # K, RFC 2890 2.1
    SEQUENCE = 0x1000  # S, RFC 2890 2.1
    STRICT_ROUTE = 0x0800  # RFC 1701 only
    RECURSION = 0x0400  # RFC 1701's recursion control, top bit


#: Bits 1, 4 and 5 of the first word: a receiver that does not implement RFC 1701 discards (RFC 2784 2.3).
GRE_DISCARD_BITS = 0x4C00
GRE_VERSION_MASK = 0x0007


@dataclass(frozen=True, slots=True)
class GreHeader:
    protocol: int = GRE_PROTO_IPV4
    checksum_present: bool = False
    key: int | None = None
    sequence: int | None = None
    checksum: int = 0

    @property
    def length(self) -> int:
        return GRE_BASE_LEN + 4 * (self.checksum_present + (self.key is not None) + (self.sequence is not None))


def gre_header_length(flags: int) -> int:
    """Header length implied by the first word's C, K and S bits."""
    return GRE_BASE_LEN + 4 * (bool(flags & GreFlags.CHECKSUM) + bool(flags & GreFlags.KEY) + bool(flags & GreFlags.SEQUENCE))


def parse_gre(data: bytes) -> tuple[GreHeader, bytes]:
    """Parse a GRE packet (header and payload, e.g. an outer IPv4 payload) into header and payload."""
    if len(data) < GRE_BASE_LEN:
        raise ParseError(f"gre: {len(data)} bytes, need {GRE_BASE_LEN}")
    flags, protocol = struct.unpack_from("!HH", data)
    if flags & GRE_VERSION_MASK:
        raise ParseError(f"gre: version {flags & GRE_VERSION_MASK}")
    if flags & GRE_DISCARD_BITS:
        raise ParseError(f"gre: reserved bits {flags & GRE_DISCARD_BITS:#06x} set")
    length = gre_header_length(flags)
    if len(data) < length:
        raise ParseError(f"gre: {len(data)} bytes, header needs {length}")
    offset = GRE_BASE_LEN
    checksum = 0
    if flags & GreFlags.CHECKSUM:
        if not checksum_ok(data):
            raise ParseError("gre: bad checksum")
        checksum = struct.unpack_from("!H", data, offset)[0]
        offset += 4
    key = sequence = None
    if flags & GreFlags.KEY:
        key = struct.unpack_from("!I", data, offset)[0]
        offset += 4
    if flags & GreFlags.SEQUENCE:
        sequence = struct.unpack_from("!I", data, offset)[0]
        offset += 4
    header = GreHeader(protocol, bool(flags & GreFlags.CHECKSUM), key, sequence, checksum)
    return header, bytes(data[offset:])


def build_gre(header: GreHeader, payload: bytes) -> bytes:
    """Header and payload; with checksum_present the checksum covers both (RFC 2784 2.5)."""
    flags = 0
    rest = b""
    if header.checksum_present:
        flags |= GreFlags.CHECKSUM
        rest += b"\x00\x00\x00\x00"
    if header.key is not None:
        flags |= GreFlags.KEY
        rest += struct.pack("!I", header.key)
    if header.sequence is not None:
        flags |= GreFlags.SEQUENCE
        rest += struct.pack("!I", header.sequence)
    raw = struct.pack("!HH", flags, header.protocol) + rest + payload
    if header.checksum_present:
        csum = internet_checksum(raw)
        raw = raw[:4] + csum.to_bytes(2, "big") + raw[6:]
    return raw
