"""The configuration file (TOML), checked completely before anything is attached.

Every error names the key path and the value, e.g. `services[0].backends[1].weight: -1 is not >= 0`,
so a bad deployment fails with one line that says where to look. Unknown keys are errors at every level:
a misspelt `intervall` silently ignored would be a health check that never does what was meant.

    device = "eth0"
    engine = "auto"                 # auto | xdp | afpacket
    table_size = 65537              # prime
    control_socket = "/run/rusty-rail/control.sock"
    metrics = "127.0.0.1:9100"      # absent = off
    workers = 1                     # AF_PACKET worker processes (as RR_WORKERS)
    connection_capacity = 1048576   # connection table entries, LRU beyond (as RR_CONN_CAPACITY)
    [[services]]
    vip = "10.1.0.1"
    protocol = "tcp"                # tcp | udp | any; default tcp with a port, any without
    port = 80                       # 0 = every port
    backends = ["10.2.0.1", { address = "10.2.0.2", weight = 2 }]
    [services.health]
    type = "tcp"                    # tcp | http | none
    ...
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from ipaddress import AddressValueError, IPv4Address
from typing import Any

from rusty_rail.config import MAX_CONN_CAPACITY, ConfigError, EngineKind, EnvConfig
from rusty_rail.control.model import BackendSpec, Config, HealthSpec, HealthType, ServiceSpec
from rusty_rail.core.maglev import is_prime
from rusty_rail.core.service import ServiceKey, ServiceProtocol

__all__ = ["ConfigError", "load_config", "loads_config", "parse_config", "config_from_env"]

_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,253})$")
MAX_WEIGHT = 1000
"""A weight is extra Maglev turns per round; beyond this the ratios are finer than the table can show."""
MAX_TABLE_SIZE = 4_000_037
"""Tables are built in Python on every change; much larger ones make a change take seconds."""

_TOP_KEYS = {"device", "engine", "table_size", "control_socket", "metrics", "workers", "connection_capacity",
             "services"}
_SERVICE_KEYS = {"vip", "protocol", "port", "backends", "health"}
_BACKEND_KEYS = {"address", "weight"}
_HEALTH_KEYS = {"type", "port", "path", "interval", "timeout", "rise", "fall"}


def _show(value: Any) -> str:
    """A value as it would be written in the file (strings quoted, booleans lower case)."""
    if isinstance(value, (str, bool)):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return str(value)


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def _table(value: Any, path: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, f"{_show(value)} is not a table")
    for key in value:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise _fail(where, f"unknown key (expected one of {', '.join(sorted(allowed))})")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _int(value: Any, path: str, minimum: int, maximum: int) -> int:
    # TOML booleans are not numbers, though Python's bool is an int.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"{_show(value)} is not a whole number")
    if value < minimum:
        raise _fail(path, f"{value} is not >= {minimum}")
    if value > maximum:
        raise _fail(path, f"{value} is not <= {maximum}")
    return value


def _seconds(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, f"{_show(value)} is not a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise _fail(path, f"{value} is not > 0")
    if value > 3600:
        raise _fail(path, f"{value} is not <= 3600")
    return float(value)


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"{_show(value)} is not a string")
    return value


def _choice(value: Any, path: str, choices: tuple[str, ...]) -> str:
    text = _str(value, path)
    if text not in choices:
        raise _fail(path, f"{_show(value)} is not one of {', '.join(choices)}")
    return text


def _ipv4(value: Any, path: str) -> IPv4Address:
    text = _str(value, path)
    try:
        address = IPv4Address(text)
    except AddressValueError:
        raise _fail(path, f"{_show(value)} is not an IPv4 address") from None
    if address.is_unspecified or address.is_multicast or address == IPv4Address("255.255.255.255"):
        raise _fail(path, f"{_show(value)} is not a unicast address")
    return address


def parse_metrics_address(value: Any, path: str = "metrics") -> tuple[str, int]:
    """'127.0.0.1:9100' -> ('127.0.0.1', 9100). The host is an IPv4 address or a host name."""
    text = _str(value, path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise _fail(path, f"{_show(value)} is not host:port")
    try:
        IPv4Address(host)
    except AddressValueError:
        if not _HOSTNAME.match(host) or host.replace(".", "").isdigit():
            raise _fail(path, f"{_show(value)}: {host!r} is not an IPv4 address or host name") from None
    port = int(port_text)
    if not 1 <= port <= 0xFFFF:
        raise _fail(path, f"{_show(value)}: port {port} is not in 1..65535")
    return host, port


def _backend(value: Any, path: str) -> BackendSpec:
    if isinstance(value, str):
        return BackendSpec(_ipv4(value, path))
    table = _table(value, path, _BACKEND_KEYS)
    if "address" not in table:
        raise _fail(_join(path, "address"), "missing")
    weight = _int(table.get("weight", 1), _join(path, "weight"), 0, MAX_WEIGHT)
    return BackendSpec(_ipv4(table["address"], _join(path, "address")), weight)


def _health(value: Any, path: str, service_port: int) -> HealthSpec:
    table = _table(value, path, _HEALTH_KEYS)
    kind = HealthType(_choice(table.get("type", "none"), _join(path, "type"), tuple(t.value for t in HealthType)))
    defaults = HealthSpec()
    port = _int(table.get("port", 0), _join(path, "port"), 0, 0xFFFF)
    if kind != HealthType.NONE and port == 0 and service_port == 0:
        raise _fail(_join(path, "port"), "0 (the service's port) but the service covers every port; give a port")
    path_value = defaults.path
    if "path" in table:
        if kind != HealthType.HTTP:
            raise _fail(_join(path, "path"), f"{_show(table['path'])} is only for type \"http\"")
        path_value = _str(table["path"], _join(path, "path"))
        if not path_value.startswith("/") or any(c in path_value for c in " \r\n\t"):
            raise _fail(_join(path, "path"), f"{_show(path_value)} is not an absolute URL path")
    interval = _seconds(table.get("interval", defaults.interval), _join(path, "interval"))
    timeout = _seconds(table.get("timeout", defaults.timeout), _join(path, "timeout"))
    if timeout > interval:
        # A probe still running when the next is due would overlap it; checks would pile up.
        raise _fail(_join(path, "timeout"), f"{timeout} is not <= interval ({interval})")
    rise = _int(table.get("rise", defaults.rise), _join(path, "rise"), 1, 100)
    fall = _int(table.get("fall", defaults.fall), _join(path, "fall"), 1, 100)
    return HealthSpec(kind, port, path_value, interval, timeout, rise, fall)


def _service(value: Any, path: str) -> ServiceSpec:
    table = _table(value, path, _SERVICE_KEYS)
    if "vip" not in table:
        raise _fail(_join(path, "vip"), "missing")
    vip = _ipv4(table["vip"], _join(path, "vip"))
    port = _int(table.get("port", 0), _join(path, "port"), 0, 0xFFFF)
    protocol_text = _choice(table.get("protocol", "tcp" if port else "any"), _join(path, "protocol"), ("tcp", "udp", "any"))
    protocol = ServiceProtocol[protocol_text.upper()]
    if protocol == ServiceProtocol.ANY and port:
        raise _fail(_join(path, "port"), f"{port} needs protocol \"tcp\" or \"udp\" (protocol \"any\" means every port: 0)")
    raw_backends = table.get("backends", [])
    if not isinstance(raw_backends, list):
        raise _fail(_join(path, "backends"), f"{_show(raw_backends)} is not a list")
    backends: list[BackendSpec] = []
    seen: dict[IPv4Address, int] = {}
    for i, raw in enumerate(raw_backends):
        where = f"{path}.backends[{i}]"
        backend = _backend(raw, where)
        if backend.address in seen:
            raise _fail(where, f"{backend.address} is already backends[{seen[backend.address]}]")
        seen[backend.address] = i
        backends.append(backend)
    health = _health(table.get("health", {}), _join(path, "health"), port)
    return ServiceSpec(ServiceKey(vip, protocol, port), tuple(backends), health)


def parse_config(data: Mapping[str, Any]) -> Config:
    """A Config from the parsed TOML document, or ConfigError naming the first bad key."""
    table = _table(dict(data), "", _TOP_KEYS)
    if "device" not in table:
        raise _fail("device", "missing")
    device = _str(table["device"], "device")
    if not _IFNAME.match(device):
        raise _fail("device", f"{_show(device)} is not an interface name")
    engine = _choice(table.get("engine", "auto"), "engine", tuple(e.value for e in EngineKind))
    table_size = _int(table.get("table_size", 65537), "table_size", 3, MAX_TABLE_SIZE)
    if not is_prime(table_size):
        raise _fail("table_size", f"{table_size} is not prime")
    socket_path = _str(table.get("control_socket", Config.control_socket), "control_socket")
    if not os.path.isabs(socket_path):
        raise _fail("control_socket", f"{_show(socket_path)} is not an absolute path")
    if len(socket_path.encode()) > 107:  # sun_path is 108 bytes with its terminating NUL
        raise _fail("control_socket", f"{_show(socket_path)} is longer than a unix socket path may be (107 bytes)")
    metrics = None
    if "metrics" in table:
        parse_metrics_address(table["metrics"])
        metrics = table["metrics"]
    workers = _int(table.get("workers", 1), "workers", 1, 256)
    capacity = None
    if "connection_capacity" in table:
        capacity = _int(table["connection_capacity"], "connection_capacity", 1, MAX_CONN_CAPACITY)
    raw_services = table.get("services", [])
    if not isinstance(raw_services, list):
        raise _fail("services", f"{_show(raw_services)} is not a list of tables ([[services]])")
    services: list[ServiceSpec] = []
    seen: dict[ServiceKey, int] = {}
    for i, raw in enumerate(raw_services):
        service = _service(raw, f"services[{i}]")
        if service.key in seen:
            raise _fail(f"services[{i}]", f"{service.key} is already services[{seen[service.key]}]")
        seen[service.key] = i
        services.append(service)
    if not services:
        # Without services the balancer would drop everything (NO_SERVICE); that is never what was meant.
        raise _fail("services", "none configured (a config file needs at least one [[services]])")
    return Config(device, engine, table_size, socket_path, metrics, tuple(services), None, workers, capacity)


def loads_config(text: str, source: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return parse_config(data)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check the file. Every failure is a ConfigError whose message is fit to print as is."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"{os.fspath(path)}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{os.fspath(path)}: not UTF-8") from None
    return loads_config(text, os.fspath(path))


def config_from_env(env: EnvConfig) -> Config:
    """The environment form (RR_DEVICE, RR_TARGET_IPS, ...) as a Config: open mode, no services."""
    return Config(
        device=env.device,
        engine=env.engine.value,
        table_size=env.table_size,
        control_socket=env.control_socket,
        metrics=env.metrics,
        open_mode_backends=tuple(env.targets),
        workers=env.workers,
        connection_capacity=env.connection_capacity,
    )
