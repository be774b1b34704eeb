"""Addresses of either family, as every layer holds them (docs/WIRE.md section 10).

Backends travel as ints on the per-packet path (an int is the cheapest dictionary key and set member).
An int below 2**32 is an IPv4 address and any other an IPv6 address: `ipaddress.ip_address`'s own
reading. That is unambiguous because the IPv6 addresses that fall below 2**32, ::/96 (unspecified,
loopback, IPv4-compatible), are never backends: `unusable()` refuses them, with IPv4-mapped addresses
(write the IPv4 address), link-local ones (no zone to send them in) and multicast.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address

Address = IPv4Address | IPv6Address
AddressLike = IPv4Address | IPv6Address | str | int

_BELOW_IPV4 = 1 << 32
_REFUSED_V6 = (
    (IPv6Network("::/96"), "in ::/96 (unspecified, loopback or IPv4-compatible)"),
    (IPv6Network("::ffff:0:0/96"), "IPv4-mapped (write the IPv4 address)"),
    (IPv6Network("fe80::/10"), "link-local"),
    (IPv6Network("ff00::/8"), "multicast"),
)
_BROADCAST = IPv4Address("255.255.255.255")


def as_address(value: AddressLike) -> Address:
    """An address object from an address, its text, or its int (below 2**32: IPv4). ValueError otherwise."""
    if isinstance(value, (IPv4Address, IPv6Address)):
        return value
    if isinstance(value, str):
        return ip_address(value.strip())
    if isinstance(value, int) and not isinstance(value, bool):
        return ip_address(value)
    raise ValueError(f"{value!r} is not an IP address")


def address_int(value: AddressLike) -> int:
    """The int a backend is held as (module docstring)."""
    return int(as_address(value))


def is_ipv6(value: int) -> bool:
    """Is the backend held as `value` an IPv6 address (module docstring)."""
    return value >= _BELOW_IPV4


def canonical_key(address: Address) -> tuple[int, int]:
    """(version, address): every IPv4 address first, in address order, then every IPv6 one."""
    return address.version, int(address)


def unusable(address: Address) -> str | None:
    """Why `address` cannot be a VIP or a backend, in words; None when it can."""
    if isinstance(address, IPv4Address):
        if address.is_unspecified or address.is_multicast or address == _BROADCAST:
            return "not a unicast address"
        return None
    for network, why in _REFUSED_V6:
        if address in network:
            return why
    return None


def with_port(address: Address, port: int) -> str:
    """'10.0.0.1:80' or '[2001:db8::1]:80' (RFC 3986 3.2.2's brackets)."""
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def split_host_port(text: str) -> tuple[str, str | None]:
    """'10.0.0.1:80' -> ('10.0.0.1', '80'); '[2001:db8::1]:80' -> ('2001:db8::1', '80'); '10.0.0.1',
    '2001:db8::1' and '[2001:db8::1]' -> (address, None). ValueError for brackets that do not close."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: unbalanced brackets")
        return host, rest[1:] if rest else None
    if text.count(":") > 1:  # a bare IPv6 address: no port can be told from it
        return text, None
    host, sep, port = text.partition(":")
    return host, port if sep else None
