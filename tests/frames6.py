"""IPv6 frames for the differential test and its kin, built with struct from RFC 8200 (fixed header,
extension headers) and RFC 4443 (ICMPv6), independent of rusty_rail.core and fast enough for tens of
thousands of frames (scapy is not).

Hypothesis strategies: `inner_packet6()` (TCP, UDP, ICMPv6 echo and errors quoting a packet, other
protocols; zero to five extension headers, fragments of every kind, bytes cut short, random bytes past
the packet) and `outer6()` (an IPv6 header of next header 47 around a GRE packet).
"""

from __future__ import annotations

import struct
from ipaddress import IPv6Address

from hypothesis import strategies as st

CLIENTS6 = ["2001:db8:c::1", "2001:db8:c::2"]
VIPS6 = ["2001:db8:1::1", "2001:db8:1::2"]
ROUTER6 = "2001:db8:137::1"

_ports = st.one_of(st.sampled_from([53, 80, 443, 40000]), st.integers(0, 0xFFFF))
addresses6 = st.one_of(st.sampled_from([int(IPv6Address(a)) for a in CLIENTS6 + VIPS6]),
                       st.integers(0, 2**128 - 1))


def ipv6(src: int, dst: int, nh: int, payload: bytes, *, tc: int = 0, label: int = 0, hlim: int = 64,
         plen: int | None = None) -> bytes:
    """The fixed header (RFC 8200 section 3) and `payload`; `plen` overrides the payload length."""
    length = len(payload) if plen is None else plen
    return struct.pack("!IHBB16s16s", 6 << 28 | tc << 20 | label, length, nh, hlim, src.to_bytes(16, "big"),
                       dst.to_bytes(16, "big")) + payload


def options_header(nh: int, units: int, fill: int = 0) -> bytes:
    """Hop-by-hop, routing or destination options: next header, length in 8-byte units beyond the first."""
    return bytes((nh, units)) + bytes((fill,)) * (6 + 8 * units)


def fragment_header(nh: int, offset: int, more: bool, ident: int) -> bytes:
    return struct.pack("!BBHI", nh, 0, offset << 3 | int(more), ident)


QUIC_SERVER_IDS = tuple(range(1, 9))
"""Server IDs the differential test gives its backends (QUIC payloads name them, or any other)."""


@st.composite
def udp_payload(draw, max_size: int) -> bytes:
    """Random bytes, or now and then the start of a QUIC packet (docs/WIRE.md section 11.4): either header
    form, config rotation bits 0 or not, a server ID of QUIC_SERVER_IDS or any."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=max_size))
    rotation = draw(st.sampled_from([0, 0, 0, 0x20, 0xE0])) | draw(st.integers(0, 0x1F))
    server_id = draw(st.one_of(st.sampled_from(QUIC_SERVER_IDS), st.integers(0, 0xFFFF)))
    first = draw(st.sampled_from([0x40, 0x40, 0xC0])) | draw(st.integers(0, 0x3F))  # short, short, long
    return bytes((first, rotation)) + server_id.to_bytes(2, "big") + draw(st.binary(max_size=8))


@st.composite
def transport6(draw, nh: int) -> bytes:
    """A TCP/UDP/ICMPv6 header (maybe cut short) and payload, or random bytes for other protocols."""
    payload = draw(udp_payload(16)) if nh == 17 else draw(st.binary(max_size=16))
    if nh == 6:
        header = struct.pack("!HHIIBBHHH", draw(_ports), draw(_ports), 1, 0, 0x50, 0x10, 65535, 0, 0)
    elif nh == 17:
        header = struct.pack("!HHHH", draw(_ports), draw(_ports), 8 + len(payload), 0)
    elif nh == 58:
        kind = draw(st.sampled_from([1, 2, 3, 4, 128, 135]))
        header = struct.pack("!BBHI", kind, 0, 0, draw(st.integers(0, 2**32 - 1)))
        if kind <= 4 and draw(st.booleans()):
            payload = draw(quoted6())
    else:
        header = b""
    out = header + payload
    if draw(st.integers(0, 9)) == 0:
        out = out[: draw(st.integers(0, min(len(out), 10)))]
    return out


@st.composite
def quoted6(draw) -> bytes:
    """The packet an ICMPv6 error quotes (a backend's reply to a client), possibly incomplete."""
    nh = draw(st.sampled_from([6, 17, 58, 44, 0]))
    quoted = ipv6(draw(addresses6), draw(addresses6), nh, struct.pack("!HH", draw(_ports), draw(_ports)))
    if draw(st.integers(0, 4)) == 0:
        quoted = bytes([draw(st.integers(0, 255))]) + quoted[1:]  # another version
    return quoted[: draw(st.integers(0, len(quoted)))] if draw(st.integers(0, 3)) == 0 else quoted


@st.composite
def extension_chain(draw, last: int) -> tuple[int, bytes]:
    """(first next header, bytes) of 0-5 extension headers ending in `last`; fragments of every kind."""
    kinds = draw(st.lists(st.sampled_from([0, 43, 60, 44]), max_size=5))
    chain = b""
    nh = last
    for kind in reversed(kinds):
        if kind == 44:
            offset = draw(st.sampled_from([0, 0, 1, 185]))
            chain = fragment_header(nh, offset, draw(st.booleans()), draw(st.integers(0, 2**32 - 1))) + chain
        else:
            chain = options_header(nh, draw(st.integers(0, 2))) + chain
        nh = kind
    return nh, chain


@st.composite
def inner_packet6(draw) -> bytes:
    """An inner IPv6 packet to one of VIPS6, with bytes past its payload length now and then."""
    nh = draw(st.sampled_from([6, 6, 17, 17, 58, 58, 59, 50, 47]))
    first, chain = draw(extension_chain(nh))
    body = chain + draw(transport6(nh))
    src = draw(st.sampled_from([int(IPv6Address(a)) for a in CLIENTS6])) if draw(st.booleans()) else draw(addresses6)
    plen = None
    if draw(st.integers(0, 9)) == 0:  # a payload length that cuts the extension headers or ports short
        plen = draw(st.integers(0, len(body)))
        body = body[:plen] if draw(st.booleans()) else body
    packet = ipv6(src, int(IPv6Address(draw(st.sampled_from(VIPS6)))), first, body,
                  tc=draw(st.integers(0, 255)), label=draw(st.integers(0, 0xFFFFF)), plen=plen)
    return packet + draw(st.binary(max_size=6))


def outer6(router: int, lb: int, gre: bytes, *, tc: int = 0, hlim: int = 64) -> bytes:
    """The outer IPv6 header (next header 47) around a GRE packet."""
    return ipv6(router, lb, 47, gre, tc=tc, hlim=hlim)
