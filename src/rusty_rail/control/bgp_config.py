"""The `[bgp]` section and the per-service route keys, through config_values.py's checks (errors name the
key path and the value, like every other key).

    [bgp]
    local_as = 65001
    router_id = "192.168.137.11"    # default: the device's first IPv4 address
    drain_timeout = 30.0            # on a planned stop: withdraw, wait until the VIPs' traffic stops (or this)
    [[bgp.peers]]
    address = "192.168.137.1"
    as = 65000
    hold_time = 3                   # seconds; 0 (no keepalives) or 3..65535 (RFC 4271 4.2)
    password = "secret"             # optional: TCP MD5 (RFC 2385)

    [[services]]                    # per service (default: announce = true, no communities, no MED)
    announce = true                 # an IPv4 VIP as a /32, an IPv6 one as a /128
    communities = ["65000:80"]
    med = 10
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import AddressValueError, IPv4Address
from typing import TYPE_CHECKING, Any

from rusty_rail.control import config_values as check
from rusty_rail.control.config import RouteSpec
from rusty_rail.core.address import Address, unusable

if TYPE_CHECKING:
    from rusty_rail.control.config import ServiceSpec

MAX_ASN = 0xFFFFFFFF  # four-octet AS numbers (RFC 6793)
MAX_PASSWORD = 80  # TCP_MD5SIG_MAXKEYLEN
DEFAULT_HOLD_TIME = 3
DEFAULT_DRAIN_TIMEOUT = 30.0

_BGP_KEYS = {"local_as", "router_id", "drain_timeout", "peers"}
_PEER_KEYS = {"address", "as", "hold_time", "password"}
ROUTE_KEYS = {"announce", "communities", "med"}
"""Keys of a [[services]] table that belong to its route (RouteSpec)."""


@dataclass(frozen=True)
class PeerSpec:
    address: IPv4Address
    """The router to announce to."""
    asn: int
    """Its AS number (`as` in the file)."""
    hold_time: int = DEFAULT_HOLD_TIME
    """Seconds without a message before the session is declared dead (keepalives every third of it)."""
    password: str | None = None
    """TCP MD5 signature key (RFC 2385), or None."""


@dataclass(frozen=True)
class BgpSpec:
    local_as: int
    peers: tuple[PeerSpec, ...]
    router_id: IPv4Address | None = None
    """None: the device's first IPv4 address, found at start."""
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    """On a planned stop: the longest wait, after withdrawing, for the VIPs' traffic to stop arriving."""


def _ipv4(value: Any, name: str) -> IPv4Address:
    """A router ID or a peer's address: the sessions are IPv4 (RFC 4271's BGP Identifier is 32 bits)."""
    text = check.string(value, name).strip()
    try:
        address = IPv4Address(text)
    except AddressValueError:
        raise check.fail(name, f"{check.show(value)} is not an IPv4 address") from None
    if unusable(address):
        raise check.fail(name, f"{check.show(value)} is not a unicast address")
    return address


def parse_route(table: Mapping[str, Any], path: str, catch_all: bool) -> RouteSpec:
    """A service's route keys (announce, communities, med) out of its [[services]] table."""
    if catch_all:
        for key in ROUTE_KEYS & set(table):
            if key != "announce" or table[key] is not False:
                raise check.fail(check.join(path, key), f"{check.show(table[key])}: the catch-all service (vip \"*\") has no VIP "
                            "to announce")
        return RouteSpec(announce=False)
    announce = table.get("announce", True)
    if not isinstance(announce, bool):
        raise check.fail(check.join(path, "announce"), f"{check.show(announce)} is not true or false")
    med = check.integer(table["med"], check.join(path, "med"), 0, 0xFFFFFFFF) if "med" in table else None
    raw = table.get("communities", [])
    if not isinstance(raw, list):
        raise check.fail(check.join(path, "communities"), f"{check.show(raw)} is not a list")
    communities = tuple(_community(c, f"{check.join(path, 'communities')}[{i}]") for i, c in enumerate(raw))
    return RouteSpec(announce, communities, med)


def _community(value: Any, name: str) -> tuple[int, int]:
    """'65000:80' (RFC 1997: two 16-bit halves)."""
    text = check.string(value, name).strip()
    high, sep, low = text.partition(":")
    if not sep or not high.isdigit() or not low.isdigit() or int(high) > 0xFFFF or int(low) > 0xFFFF:
        raise check.fail(name, f"{check.show(value)} is not a community ASN:VALUE (each 0..65535)")
    return int(high), int(low)


def check_shared_vips(services: Sequence[ServiceSpec]) -> None:
    """Services on one VIP share its route: their MED and communities must agree."""
    first: dict[Address, int] = {}
    for i, service in enumerate(services):
        vip = service.key.vip
        if vip is None:
            continue
        if vip not in first:
            first[vip] = i
            continue
        other = services[first[vip]].route
        for key in ("med", "communities"):
            if getattr(service.route, key) != getattr(other, key):
                raise check.fail(f"services[{i}].{key}", f"differs from services[{first[vip]}].{key}: both announce "
                            f"{host_prefix(vip)}, one route")


def host_prefix(vip: Address) -> str:
    """The route of one VIP: a /32 or a /128."""
    return f"{vip}/{vip.max_prefixlen}"


def parse_bgp(value: Any, path: str = "bgp") -> BgpSpec:
    """[bgp]. The sessions are IPv4 (router IDs and peers); they carry the IPv6 VIPs' routes too
    (multiprotocol BGP, RFC 4760), whose next hop is the device's global IPv6 address (runtime.py)."""
    table = check.table(value, path, _BGP_KEYS)
    if "local_as" not in table:
        raise check.fail(check.join(path, "local_as"), "missing")
    local_as = check.integer(table["local_as"], check.join(path, "local_as"), 1, MAX_ASN)
    router_id = _ipv4(table["router_id"], check.join(path, "router_id")) if "router_id" in table else None
    drain = check.seconds(table.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT), check.join(path, "drain_timeout"))
    peers = check.unique_list(table.get("peers", []), check.join(path, "peers"), _peer, lambda p: p.address,
                              none="none configured (add at least one [[bgp.peers]] with address and as)",
                              key_name="address")
    return BgpSpec(local_as, tuple(peers), router_id, drain)


def _peer(value: Any, path: str) -> PeerSpec:
    table = check.table(value, path, _PEER_KEYS)
    for key in ("address", "as"):
        if key not in table:
            raise check.fail(check.join(path, key), "missing")
    hold = check.integer(table.get("hold_time", DEFAULT_HOLD_TIME), check.join(path, "hold_time"), 0, 0xFFFF)
    if hold in (1, 2):  # RFC 4271 4.2: zero, or at least three seconds
        raise check.fail(check.join(path, "hold_time"), f"{hold} is not 0 or >= 3 (RFC 4271)")
    password = None
    if "password" in table:
        password = check.string(table["password"], check.join(path, "password"))
        if not 1 <= len(password.encode()) <= MAX_PASSWORD or any(c in password for c in "\"\\\n;{}"):
            # Written into the speaker's configuration: quotes, braces or semicolons would end the value.
            raise check.fail(check.join(path, "password"), f"must be 1..{MAX_PASSWORD} bytes without quotes, "
                        "backslashes, braces, semicolons or newlines")
    return PeerSpec(_ipv4(table["address"], check.join(path, "address")),
                    check.integer(table["as"], check.join(path, "as"), 1, MAX_ASN), hold, password)
