"""The configuration: one frozen `Config`, from a TOML file or from the environment, through the same
validators, checked completely before anything is attached.

Every error is one line naming what the user wrote and the bad value: the key path in the file
(`services[0].backends[1].weight: -1 is not >= 0`) or the environment variable (`RR_METRICS:
"bad_host:9100": "bad_host" is not an IPv4 address or host name`). Unknown keys in a file are errors at
every level: a misspelt `intervall` silently ignored would be a health check that never does what was
meant.

The environment form of the original, `RR_DEVICE=eth0 RR_TARGET_IPS="10.2.0.1;10.2.0.2"`, is one
catch-all service (every VIP, protocol and port, of both families) over those backends; after this module
there are only services. VIPs and backends are IPv4 or IPv6 addresses wherever one is taken, and a pool
may mix them (docs/WIRE.md section 10 names the IPv6 ranges refused). The file form
(deploy/config.example.toml):

    device = "eth0"
    engine = "auto"                 # auto | xdp | afpacket                 (RR_ENGINE)
    xdp_mode = "auto"               # auto | native | generic               (RR_XDP_MODE)
    xdp_dispatcher = false          # true: always through libxdp's dispatcher (RR_XDP_DISPATCHER)
    table_size = 65537              # prime                                 (RR_TABLE_SIZE)
    control_socket = "/run/rusty-rail/control.sock"                       # (RR_CONTROL_SOCKET)
    metrics = "127.0.0.1:9100"      # absent = off                          (RR_METRICS)
    workers = 1                     # AF_PACKET worker processes; default: CPUs - 1 (RR_WORKERS)
    connection_capacity = 1048576   # connection table entries, LRU beyond  (RR_CONN_CAPACITY)
    pin_root = "/sys/fs/bpf/..."    # hitless restart pins (RR_PIN_ROOT; default DEFAULT_PIN_ROOT)
    [[services]]
    vip = "10.1.0.1"                # or "2001:db8:1::1"; "*": the catch-all, every VIP (the environment form)
    protocol = "tcp"                # tcp | udp | any; default tcp with a port, any without
    port = 80                       # 0 = every port
    backends = ["10.2.0.1", { address = "2001:db8:2::2", weight = 2 }]
    hash = "5-tuple"                # + connection_table, answer_ping, quic: service_options.py
    [services.health]
    type = "tcp"                    # tcp | http | none
    port = 80                       # 0 = the service's port
    path = "/"                      # http only
    interval = 1.0
    timeout = 0.5
    rise = 2
    fall = 2
    [bgp]                           # announce the VIPs to routers: control/bgp_config.py has the keys
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from rusty_rail.control import config_values as check
from rusty_rail.control.config_values import ConfigError
from rusty_rail.core.address import Address
from rusty_rail.core.constants import (
    DEFAULT_CONN_CAPACITY,
    DEFAULT_PIN_ROOT,
    DEFAULT_TABLE_SIZE,
    MAX_CONN_CAPACITY,
)
from rusty_rail.core.options import ENVIRONMENT_OPTIONS, ServiceOptions
from rusty_rail.core.service import CATCH_ALL_NAME, ServiceKey, ServiceProtocol
from rusty_rail.dataplane import EngineKind, EngineOptions, XdpMode, default_workers

if TYPE_CHECKING:
    from rusty_rail.control.bgp_config import BgpSpec

DEFAULT_CONTROL_SOCKET = "/run/rusty-rail/control.sock"
MAX_WORKERS = 256


class HealthType(str, Enum):
    TCP = "tcp"
    HTTP = "http"
    NONE = "none"


@dataclass(frozen=True)
class HealthSpec:
    type: HealthType = HealthType.NONE
    """How a backend is checked: a TCP connect, an HTTP GET (2xx/3xx passes), or not at all."""
    port: int = 0
    """The port checked; 0: the service's port."""
    path: str = "/"
    """The URL path of an HTTP check."""
    interval: float = 1.0
    """Seconds between the starts of two checks of one backend."""
    timeout: float = 0.5
    """Seconds a check may take (at most the interval, so checks never overlap)."""
    rise: int = 2
    """Passes in a row that bring a backend that is down back up."""
    fall: int = 2
    """Failures in a row that take a backend down."""


@dataclass(frozen=True)
class BackendSpec:
    address: Address
    """Where the re-encapsulated packets go (IPv4 or IPv6: the outer header's family is the backend's)."""
    weight: int = 1
    """Maglev turns per round (0: drained from the start: listed, no new flows)."""
    server_id: int | None = None
    """The server ID its QUIC connection IDs carry (a service with quic = true; service_options.py)."""


@dataclass(frozen=True)
class RouteSpec:
    """How a service's VIP is announced over BGP (keys announce, communities, med; bgp_config.py)."""

    announce: bool = True
    """Announce the VIP (/32) while this balancer can serve the service."""
    communities: tuple[tuple[int, int], ...] = ()
    """RFC 1997 communities (ASN, value) attached to the route."""
    med: int | None = None
    """MULTI_EXIT_DISC (RFC 4271 5.1.4); None: not sent."""


@dataclass(frozen=True)
class ServiceSpec:
    key: ServiceKey
    """(VIP, protocol, port), or the catch-all of the environment form."""
    backends: tuple[BackendSpec, ...]
    health: HealthSpec = HealthSpec()
    route: RouteSpec = RouteSpec()
    options: ServiceOptions = ServiceOptions()
    """hash, connection_table, answer_ping, quic (service_options.py; docs/WIRE.md section 11)."""


@dataclass(frozen=True)
class Config:
    device: str
    """The interface GRE arrives on and leaves by; its first IPv4 address is the outer source."""
    services: tuple[ServiceSpec, ...]
    """What is balanced; a packet of no service is dropped and counted (NO_SERVICE)."""
    engine: EngineKind = EngineKind.AUTO
    """auto (XDP where it delivers, else AF_PACKET), xdp or afpacket."""
    xdp_mode: XdpMode = XdpMode.AUTO
    """How the XDP program attaches: auto, native (driver) or generic (skb)."""
    xdp_dispatcher: bool = False
    """Always through libxdp's dispatcher; false: only beside another's program (engines/xdp/hook.py)."""
    table_size: int = DEFAULT_TABLE_SIZE
    """Maglev table size M, a prime (the paper: M > 100 x backends for < 1% imbalance)."""
    control_socket: str | None = DEFAULT_CONTROL_SOCKET
    """Path of the control socket (`rusty-rail ctl`); None: none (the environment form's default)."""
    metrics: str | None = None
    """host:port of the Prometheus endpoint; None: off."""
    workers: int = field(default_factory=default_workers)
    """AF_PACKET worker processes (default: one less than the CPUs, dataplane.default_workers); every
    packet of a flow goes to the same one."""
    connection_capacity: int = DEFAULT_CONN_CAPACITY
    """Connection-table entries (per worker on AF_PACKET), least recently used evicted beyond."""
    pin_root: str = DEFAULT_PIN_ROOT
    """bpffs directory for the hitless restart's pins (a directory per namespace and device below it)."""
    bgp: BgpSpec | None = None
    """Announce the services' VIPs to routers over BGP ([bgp]); None: no BGP."""

    def engine_options(self) -> EngineOptions:
        return EngineOptions(device=self.device, workers=self.workers, connection_capacity=self.connection_capacity,
                             pin_root=self.pin_root, xdp_mode=self.xdp_mode,
                             xdp_dispatcher=self.xdp_dispatcher)


RESTART_FIELDS = ("device", "engine", "xdp_mode", "xdp_dispatcher", "table_size", "control_socket", "metrics", "workers",
                  "connection_capacity", "pin_root", "bgp")
"""Fields a reload reports but does not apply: they take effect after a restart."""


# -- the file ------------------------------------------------------------------------------------------

_TOP_KEYS = {"device", "engine", "xdp_mode", "xdp_dispatcher", "table_size", "control_socket", "metrics", "workers",
             "connection_capacity", "pin_root", "services", "bgp"}
_SERVICE_KEYS = {"vip", "protocol", "port", "backends", "health", "announce", "communities", "med", "hash",
                 "connection_table", "answer_ping", "quic"}
_HEALTH_KEYS = {"type", "port", "path", "interval", "timeout", "rise", "fall"}



def _health(value: Any, path: str, service_port: int) -> HealthSpec:
    table = check.table(value, path, _HEALTH_KEYS)
    kind = HealthType(check.choice(table.get("type", "none"), check.join(path, "type"), tuple(t.value for t in HealthType)))
    defaults = HealthSpec()
    port = check.integer(table.get("port", 0), check.join(path, "port"), 0, 0xFFFF)
    if kind != HealthType.NONE and port == 0 and service_port == 0:
        raise check.fail(check.join(path, "port"), "0 (the service's port) but the service covers every port; give a port")
    path_value = defaults.path
    if "path" in table:
        if kind != HealthType.HTTP:
            raise check.fail(check.join(path, "path"), f"{check.show(table['path'])} is only for type \"http\"")
        path_value = check.string(table["path"], check.join(path, "path"))
        if not path_value.startswith("/") or any(c in path_value for c in " \r\n\t"):
            raise check.fail(check.join(path, "path"), f"{check.show(path_value)} is not an absolute URL path")
    interval = check.seconds(table.get("interval", defaults.interval), check.join(path, "interval"))
    timeout = check.seconds(table.get("timeout", defaults.timeout), check.join(path, "timeout"))
    if timeout > interval:
        # A probe still running when the next is due would overlap it; checks would pile up.
        raise check.fail(check.join(path, "timeout"), f"{timeout} is not <= interval ({interval})")
    rise = check.integer(table.get("rise", defaults.rise), check.join(path, "rise"), 1, 100)
    fall = check.integer(table.get("fall", defaults.fall), check.join(path, "fall"), 1, 100)
    return HealthSpec(kind, port, path_value, interval, timeout, rise, fall)


def _service(value: Any, path: str) -> ServiceSpec:
    from rusty_rail.control.bgp_config import parse_route  # they build on this module's validators
    from rusty_rail.control.service_options import parse_backends, parse_options

    table = check.table(value, path, _SERVICE_KEYS)
    if "vip" not in table:
        raise check.fail(check.join(path, "vip"), "missing")
    if table["vip"] == CATCH_ALL_NAME:  # every VIP, protocol and port: what the environment form serves
        for key in ("protocol", "port"):
            if key in table and table[key] not in ("any", 0):
                raise check.fail(check.join(path, key), f"{check.show(table[key])}: the catch-all service (vip \"*\") covers "
                            "every protocol and port")
        backends = parse_backends(table.get("backends", []), check.join(path, "backends"))
        return ServiceSpec(ServiceKey.catch_all(), backends, _health(table.get("health", {}), check.join(path, "health"), 0),
                           parse_route(table, path, catch_all=True), parse_options(table, path, ServiceProtocol.ANY, backends))
    vip = check.address(table["vip"], check.join(path, "vip"))
    port = check.integer(table.get("port", 0), check.join(path, "port"), 0, 0xFFFF)
    protocol_text = check.choice(table.get("protocol", "tcp" if port else "any"), check.join(path, "protocol"), ("tcp", "udp", "any"))
    protocol = ServiceProtocol[protocol_text.upper()]
    if protocol == ServiceProtocol.ANY and port:
        raise check.fail(check.join(path, "port"), f"{port} needs protocol \"tcp\" or \"udp\" (protocol \"any\" means every port: 0)")
    backends = parse_backends(table.get("backends", []), check.join(path, "backends"))
    health = _health(table.get("health", {}), check.join(path, "health"), port)
    return ServiceSpec(ServiceKey(vip, protocol, port), backends, health, parse_route(table, path, catch_all=False),
                       parse_options(table, path, protocol, backends))


def parse_config(data: Mapping[str, Any]) -> Config:
    """A Config from a parsed TOML document, or ConfigError naming the first bad key."""
    table = check.table(dict(data), "", _TOP_KEYS)
    if "device" not in table:
        raise check.fail("device", "missing")
    # Without services the balancer would drop everything (NO_SERVICE); that is never what was meant.
    services = check.unique_list(table.get("services", []), "services", _service, lambda s: s.key,
                                 none="none configured (a config file needs at least one [[services]])")
    from rusty_rail.control.bgp_config import check_shared_vips, parse_bgp

    check_shared_vips(services)
    config = _common(table, names=lambda key: key, services=tuple(services), control_socket_default=DEFAULT_CONTROL_SOCKET)
    return dataclasses.replace(config, bgp=parse_bgp(table["bgp"])) if "bgp" in table else config


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


# -- the environment -------------------------------------------------------------------------------------

ENVIRONMENT = {
    "device": "RR_DEVICE",
    "engine": "RR_ENGINE",
    "xdp_mode": "RR_XDP_MODE",
    "xdp_dispatcher": "RR_XDP_DISPATCHER",
    "table_size": "RR_TABLE_SIZE",
    "control_socket": "RR_CONTROL_SOCKET",
    "metrics": "RR_METRICS",
    "workers": "RR_WORKERS",
    "connection_capacity": "RR_CONN_CAPACITY",
    "pin_root": "RR_PIN_ROOT",
}
"""File key -> environment variable, for every setting the environment form takes (and RR_TARGET_IPS)."""


def parse_targets(value: str, name: str = "RR_TARGET_IPS") -> tuple[Address, ...]:
    """'10.2.0.1;10.2.0.2' or '2001:db8:2::1;2001:db8:2::2', mixed as one likes (',' and white space
    separate too)."""
    parts = [p for p in re.split(r"[;,\s]+", value) if p]
    if not parts:
        raise check.fail(name, "lists no addresses")
    targets = [check.address(part, name) for part in parts]
    if len(set(targets)) != len(targets):
        raise check.fail(name, "an address is listed twice")
    return tuple(targets)


def from_environment(env: Mapping[str, str] | None = None) -> Config:
    """The original's form: RR_DEVICE and RR_TARGET_IPS (+ the optional variables of ENVIRONMENT),
    as one catch-all service. Empty variables count as unset."""
    env = os.environ if env is None else env
    present = {key: env[var] for key, var in ENVIRONMENT.items() if env.get(var, "").strip()}
    if "device" not in present:
        raise check.fail("RR_DEVICE", "is not set")
    raw_targets = env.get("RR_TARGET_IPS", "").strip()
    if not raw_targets:
        raise check.fail("RR_TARGET_IPS", "is not set")
    targets = parse_targets(raw_targets)
    service = ServiceSpec(ServiceKey.catch_all(), tuple(BackendSpec(t) for t in targets), options=ENVIRONMENT_OPTIONS)
    return _common(present, names=ENVIRONMENT.__getitem__, services=(service,), control_socket_default=None)


# -- what both forms share --------------------------------------------------------------------------------


def _common(values: Mapping[str, Any], names: Any, services: tuple[ServiceSpec, ...],
            control_socket_default: str | None) -> Config:
    """The settings both forms have, each through its validator, named as the user wrote it."""

    def get(key: str, validate: Any, default: Any, *args: Any) -> Any:
        return validate(values[key], names(key), *args) if key in values else default

    socket_path = get("control_socket", check.socket_path, control_socket_default)
    return Config(
        device=check.device_name(values["device"], names("device")),
        services=services,
        engine=EngineKind(get("engine", check.choice, "auto", tuple(e.value for e in EngineKind))),
        xdp_mode=XdpMode(get("xdp_mode", check.choice, "auto", tuple(m.value for m in XdpMode))),
        xdp_dispatcher=get("xdp_dispatcher", check.flag, False),
        table_size=get("table_size", check.table_size, DEFAULT_TABLE_SIZE),
        control_socket=socket_path,
        metrics=get("metrics", check.metrics_address, None),
        workers=get("workers", check.integer, default_workers(), 1, MAX_WORKERS),
        connection_capacity=get("connection_capacity", check.integer, DEFAULT_CONN_CAPACITY, 1, MAX_CONN_CAPACITY),
        pin_root=get("pin_root", check.absolute_path, DEFAULT_PIN_ROOT),
    )
