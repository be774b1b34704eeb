"""Ethernet II frames (IEEE 802.3): the 14-byte header the engines see."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from rusty_rail.core.errors import ParseError

ETHERNET_HEADER_LEN = 14
_HEADER = struct.Struct("!6s6sH")


class EtherType(IntEnum):
    IPV4 = 0x0800
    ARP = 0x0806
    VLAN = 0x8100
    IPV6 = 0x86DD


@dataclass(frozen=True, slots=True)
class EthernetHeader:
    dst: bytes
    src: bytes
    ethertype: int


def parse_ethernet(frame: bytes) -> tuple[EthernetHeader, bytes]:
    """Split a frame into its header and payload."""
    if len(frame) < ETHERNET_HEADER_LEN:
        raise ParseError(f"ethernet: {len(frame)} bytes, need {ETHERNET_HEADER_LEN}")
    dst, src, ethertype = _HEADER.unpack_from(frame)
    return EthernetHeader(dst, src, ethertype), bytes(frame[ETHERNET_HEADER_LEN:])


def build_ethernet(header: EthernetHeader, payload: bytes) -> bytes:
    if len(header.dst) != 6 or len(header.src) != 6:
        raise ParseError("ethernet: addresses are 6 bytes")
    return _HEADER.pack(header.dst, header.src, header.ethertype) + payload


def mac_to_bytes(mac: str) -> bytes:
    """'02:00:00:00:00:01' -> 6 bytes."""
    parts = mac.split(":")
    if len(parts) != 6:
        raise ParseError(f"not a MAC address: {mac!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError as exc:
        raise ParseError(f"not a MAC address: {mac!r}") from exc


def mac_to_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)
