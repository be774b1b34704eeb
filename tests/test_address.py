"""core/address.py: addresses of either family, held as ints, and the ones refused."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from rusty_rail.core.address import address_int, as_address, canonical_key, is_ipv6, split_host_port, unusable, with_port


def test_ints_name_one_family_each() -> None:
    for text in ("10.2.0.1", "255.255.255.254", "2001:db8::1", "64:ff9b::1"):
        n = address_int(text)
        assert as_address(n) == ip_address(text)
        assert is_ipv6(n) == (ip_address(text).version == 6)


@pytest.mark.parametrize("text", ["::", "::1", "::10.2.0.1", "::ffff:10.2.0.1", "fe80::1", "ff02::1", "0.0.0.0",
                                  "224.0.0.1", "255.255.255.255"])
def test_addresses_that_cannot_be_backends_say_why(text: str) -> None:
    assert unusable(ip_address(text))


def test_the_ambiguous_range_is_exactly_the_refused_one() -> None:
    # Every IPv6 address whose int is below 2**32 is in ::/96, which unusable() refuses.
    assert unusable(IPv6Address((1 << 32) - 1)) and not unusable(IPv6Address(1 << 32 | 1 << 100))
    assert unusable(IPv4Address("10.2.0.1")) is None and unusable(IPv6Address("2001:db8::1")) is None


def test_canonical_order_is_version_then_address() -> None:
    mixed = [ip_address(a) for a in ("2001:db8::2", "10.2.0.2", "2001:db8::1", "10.2.0.1")]
    assert [str(a) for a in sorted(mixed, key=canonical_key)] == ["10.2.0.1", "10.2.0.2", "2001:db8::1", "2001:db8::2"]


@pytest.mark.parametrize("text, host, port", [
    ("10.0.0.1:80", "10.0.0.1", "80"), ("10.0.0.1", "10.0.0.1", None), ("[2001:db8::1]:443", "2001:db8::1", "443"),
    ("[2001:db8::1]", "2001:db8::1", None), ("2001:db8::1", "2001:db8::1", None),
])
def test_host_and_port(text: str, host: str, port: str | None) -> None:
    assert split_host_port(text) == (host, port)
    if port is not None:
        assert with_port(ip_address(host), int(port)) == text


def test_unbalanced_brackets_and_non_addresses() -> None:
    for bad in ("[2001:db8::1", "[2001:db8::1]80"):
        with pytest.raises(ValueError):
            split_host_port(bad)
    for bad in ("nope", 1.5, None, True):
        with pytest.raises(ValueError):
            as_address(bad)  # type: ignore[arg-type]
