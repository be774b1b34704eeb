"""The Internet checksum (RFC 1071), computed in software: nothing here relies on NIC offloads."""

from __future__ import annotations


def ones_complement_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit one's complement sum of `data` (padded with a zero byte when odd), plus `initial`.

    Sums the whole buffer as one big integer: since 2**16 == 1 (mod 0xFFFF), the one's complement
    sum of the 16-bit words is that integer mod 0xFFFF, which CPython computes in C, far faster than
    a Python loop over the words. 0xFFFF is returned for a non-zero sum that folds to zero, as the
    end-around carry would give.
    """
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total = int.from_bytes(data, "big") + initial
    if total == 0:
        return 0
    folded = total % 0xFFFF
    return folded if folded else 0xFFFF


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The value to put in a checksum field (RFC 1071): the complement of the one's complement sum."""
    return ~ones_complement_sum(data, initial) & 0xFFFF


def checksum_ok(data: bytes | bytearray | memoryview) -> bool:
    """True when `data`, checksum field included, sums to all ones (RFC 1071 section 1 (4))."""
    return ones_complement_sum(data) == 0xFFFF
