"""The configuration's value checks, shared by config.py, service_options.py and bgp_config.py: each
takes a value as the user wrote it and the name it was written under (a TOML key path such as
`services[0].port`, or an environment variable), and returns the value or raises ConfigError naming both.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Hashable, Mapping
from ipaddress import AddressValueError, IPv4Address
from typing import Any, TypeVar

from rusty_rail.core.address import Address, as_address, unusable
from rusty_rail.core.constants import MAX_TABLE_SIZE
from rusty_rail.core.maglev import is_prime

_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,253})$")
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key or variable and the value."""


def show(value: Any) -> str:
    """A value as it would be written in the file (strings quoted, booleans lower case)."""
    if isinstance(value, (str, bool)):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return str(value)


def fail(name: str, message: str) -> ConfigError:
    return ConfigError(f"{name}: {message}")


def integer(value: Any, name: str, minimum: int, maximum: int) -> int:
    if isinstance(value, str):  # the environment form: a number written as text
        try:
            value = int(value.strip())
        except ValueError:
            raise fail(name, f"{show(value)} is not a whole number") from None
    # TOML booleans are not numbers, though Python's bool is an int.
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(name, f"{show(value)} is not a whole number")
    if value < minimum:
        raise fail(name, f"{value} is not >= {minimum}")
    if value > maximum:
        raise fail(name, f"{value} is not <= {maximum}")
    return value


def seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(name, f"{show(value)} is not a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise fail(name, f"{value} is not > 0")
    if value > 3600:
        raise fail(name, f"{value} is not <= 3600")
    return float(value)


def string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise fail(name, f"{show(value)} is not a string")
    return value


def flag(value: Any, name: str) -> bool:
    """true or false: a TOML boolean, or as text (the environment form)."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise fail(name, f"{show(value)} is not true or false")


def choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    text = string(value, name).strip()
    if text not in choices:
        raise fail(name, f"{show(value)} is not one of {', '.join(choices)}")
    return text


def device_name(value: Any, name: str) -> str:
    device = string(value, name).strip()
    if not _IFNAME.match(device):
        raise fail(name, f"{show(value)} is not an interface name")
    return device


def address(value: Any, name: str) -> Address:
    """An IPv4 or IPv6 address a VIP or a backend may have (core/address.py unusable() says which not)."""
    text = string(value, name).strip()
    try:
        address = as_address(text)
    except ValueError:
        raise fail(name, f"{show(value)} is not an IPv4 or IPv6 address") from None
    why = unusable(address)
    if why is not None:
        raise fail(name, f"{show(value)} is {why}")
    return address


def table_size(value: Any, name: str) -> int:
    size = integer(value, name, 3, MAX_TABLE_SIZE)
    if not is_prime(size):
        raise fail(name, f"{size} is not prime")
    return size


def absolute_path(value: Any, name: str) -> str:
    path = string(value, name).strip()
    if not os.path.isabs(path):
        raise fail(name, f"{show(value)} is not an absolute path")
    return path


def socket_path(value: Any, name: str) -> str:
    path = absolute_path(value, name)
    if len(path.encode()) > 107:  # sun_path is 108 bytes with its terminating NUL
        raise fail(name, f"{show(value)} is longer than a unix socket path may be (107 bytes)")
    return path


def parse_metrics_address(value: Any, name: str = "metrics") -> tuple[str, int]:
    """'127.0.0.1:9100' -> ('127.0.0.1', 9100). The host is an IPv4 address or a host name."""
    text = string(value, name).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise fail(name, f"{show(value)} is not host:port")
    try:
        IPv4Address(host)
    except AddressValueError:
        if not _HOSTNAME.match(host) or host.replace(".", "").isdigit():
            raise fail(name, f"{show(value)}: {host!r} is not an IPv4 address or host name") from None
    port = int(port_text)
    if not 1 <= port <= 0xFFFF:
        raise fail(name, f"{show(value)}: port {port} is not in 1..65535")
    return host, port


def metrics_address(value: Any, name: str) -> str:
    parse_metrics_address(value, name)
    return str(value).strip()


def table(value: Any, path: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise fail(path, f"{show(value)} is not a table")
    for key in value:
        if key not in allowed:
            raise fail(join(path, key), f"unknown key (expected one of {', '.join(sorted(allowed))})")
    return value


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def unique_list(value: Any, path: str, item: Callable[[Any, str], T], key: Callable[[T], Hashable],
                none: str | None = None, key_name: str = "") -> list[T]:
    """A list (`[[path]]` tables, or backends' strings and tables), each entry parsed by item(raw, "path[i]").
    Two with the same key are an error at the second (`path[i]`, or `path[i].key_name`) naming the first
    (`peers[0]`); an empty list is the error `path: none` when `none` is given."""
    if not isinstance(value, list):
        raise fail(path, f"{show(value)} is not a list")
    items: list[T] = []
    seen: dict[Hashable, int] = {}
    for i, raw in enumerate(value):
        parsed = item(raw, f"{path}[{i}]")
        k = key(parsed)
        if k in seen:
            at = f"{path}[{i}]" + (f".{key_name}" if key_name else "")
            raise fail(at, f"{k} is already {path.rsplit('.', 1)[-1]}[{seen[k]}]")
        seen[k] = i
        items.append(parsed)
    if not items and none is not None:
        raise fail(path, none)
    return items
