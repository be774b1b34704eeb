"""Configuration from the environment, as the original took it: RR_DEVICE and RR_TARGET_IPS.

    RR_DEVICE=eth0 RR_TARGET_IPS="10.2.0.1;10.2.0.2" rusty-rail

Every error names the variable, so a mistyped deployment fails with one clear line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from ipaddress import AddressValueError, IPv4Address

from rusty_rail.core.maglev import DEFAULT_TABLE_SIZE, is_prime

_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
MAX_CONN_CAPACITY = 1 << 26
"""64 Mi entries: the XDP map alone would take several GiB beyond this."""


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the variable or key."""


class EngineKind(str, Enum):
    AUTO = "auto"
    AFPACKET = "afpacket"
    XDP = "xdp"


@dataclass(frozen=True)
class EnvConfig:
    device: str
    """RR_DEVICE: the interface GRE arrives on and leaves by."""
    targets: tuple[IPv4Address, ...]
    """RR_TARGET_IPS: the backends, separated by ';' (',' and spaces are accepted too)."""
    engine: EngineKind = EngineKind.AUTO
    """RR_ENGINE: auto (XDP where it loads, else AF_PACKET), afpacket, xdp."""
    workers: int = 1
    """RR_WORKERS: packet worker processes on the AF_PACKET engine."""
    table_size: int = DEFAULT_TABLE_SIZE
    """RR_TABLE_SIZE: Maglev table size, a prime."""
    control_socket: str | None = None
    """RR_CONTROL_SOCKET: path of the control socket (`rusty-rail ctl`); unset: none."""
    metrics: str | None = None
    """RR_METRICS: host:port of the Prometheus endpoint; unset: none."""
    connection_capacity: int | None = None
    """RR_CONN_CAPACITY: entries the connection table holds at most (LRU beyond); unset: 1 << 20."""


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set")
    return value


def parse_targets(value: str, name: str = "RR_TARGET_IPS") -> tuple[IPv4Address, ...]:
    parts = [p for p in re.split(r"[;,\s]+", value) if p]
    if not parts:
        raise ConfigError(f"{name} lists no addresses")
    targets = []
    for part in parts:
        try:
            targets.append(IPv4Address(part))
        except AddressValueError:
            raise ConfigError(f"{name}: {part!r} is not an IPv4 address") from None
    if len(set(targets)) != len(targets):
        raise ConfigError(f"{name}: an address is listed twice")
    return tuple(targets)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}: {value} is below {minimum}")
    return value


def from_environment(env: Mapping[str, str] | None = None) -> EnvConfig:
    env = os.environ if env is None else env
    device = _required(env, "RR_DEVICE")
    if not _IFNAME.match(device):
        raise ConfigError(f"RR_DEVICE: {device!r} is not an interface name")
    targets = parse_targets(_required(env, "RR_TARGET_IPS"))
    raw_engine = env.get("RR_ENGINE", "auto").strip() or "auto"
    try:
        engine = EngineKind(raw_engine)
    except ValueError:
        raise ConfigError(f"RR_ENGINE: {raw_engine!r} is not one of auto, afpacket, xdp") from None
    table_size = _int(env, "RR_TABLE_SIZE", DEFAULT_TABLE_SIZE, 3)
    if not is_prime(table_size):
        raise ConfigError(f"RR_TABLE_SIZE: {table_size} is not prime")
    control_socket = env.get("RR_CONTROL_SOCKET", "").strip() or None
    if control_socket is not None and not control_socket.startswith("/"):
        raise ConfigError(f"RR_CONTROL_SOCKET: {control_socket!r} is not an absolute path")
    metrics = env.get("RR_METRICS", "").strip() or None
    if metrics is not None:
        host, _, port = metrics.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"RR_METRICS: {metrics!r} is not host:port")
    capacity = _int(env, "RR_CONN_CAPACITY", 0, 1) or None
    if capacity is not None and capacity > MAX_CONN_CAPACITY:
        raise ConfigError(f"RR_CONN_CAPACITY: {capacity} is above {MAX_CONN_CAPACITY}")
    return EnvConfig(device, targets, engine, _int(env, "RR_WORKERS", 1, 1), table_size, control_socket, metrics,
                     capacity)
