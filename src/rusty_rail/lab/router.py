"""The lab router's GRE encapsulator (bpf/router_encap.c): load, attach, its maps, and the kernel
routes it follows.

The program is loaded by this process through libbpf with its maps pinned under a directory of the
lab's own (<DEFAULT_PIN_ROOT>/<prefix>router/), so two labs with different prefixes never share them;
other processes (`lab status`) open the maps there. The program itself needs no pin: the tc filter
holds it. Where GRE goes is not in a map: it is the next hop of the router's kernel route to the inner
destination (BIRD's ECMP route to a VIP, of either family), which next_hops() and route_choice() read
through netlink. The one thing a map adds is the tunnels' outer family for IPv6 next hops: over IPv6,
unless rr_encap_endpoints names an IPv4 address for that next hop (set_endpoints()).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as _pynetns
from pyroute2.netlink import NLM_F_REQUEST, NLMSG_ERROR, nlmsg
from pyroute2.netlink.rtnl import RTM_GETROUTE
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from ..bpf import bpffs, libbpf, tc
from ..bpf.build import object_path
from ..core.constants import BPFFS, DEFAULT_PIN_ROOT

PROGRAM = "rr_router_encap"
MAPS = ("rr_encap_cfg", "rr_encap_stats", "rr_encap_endpoints")
# struct rr_encap_cfg (network order): service_net, service_mask, src; service6_net, service6_mask, src6.
CFG = struct.Struct("=4s4s4s16s16s16s")
ENDPOINT_KEY, ENDPOINT = struct.Struct("=16s"), struct.Struct("=4s")  # rr_encap_endpoints: IPv6 -> IPv4
# enum rr_encap_stat, in order. "encapsulated" counts skbs (a GSO super-packet once); compare a
# balancer's "forwarded" (wire packets) with "encapsulated_wire", and its forwarded_ipv6 with
# "encapsulated_wire_ipv6" (inner IPv6). "outer_ipv6": skbs sent in GRE over IPv6.
STATS = ("encapsulated", "no_route", "no_neigh", "no_gateway", "room_fail", "encapsulated_wire",
         "encapsulated_wire_ipv6", "outer_ipv6")
_KEY = struct.Struct("=I")
_TC_PRIORITY = 49
_TC_HANDLE = 1


def ensure_bpffs() -> None:
    """Mount bpffs at BPFFS when nothing is mounted there (a fresh machine); bpffs.PinRootError if not."""
    bpffs.prepare(BPFFS)


def pin_dir(prefix: str) -> Path:
    return Path(DEFAULT_PIN_ROOT) / f"{prefix}router"


def attach(ns: str, device: str, pins: Path) -> int:
    """Load router_encap.o, pin its maps in pins, attach it on device's egress inside ns.
    Returns the program's id."""
    ensure_bpffs()
    shutil.rmtree(pins, ignore_errors=True)  # a fresh program gets fresh maps
    pins.mkdir(parents=True)
    with libbpf.BpfObject(str(object_path("router_encap"))) as obj:
        obj.load()
        for name in MAPS:
            obj.map(name).pin(str(pins / name))
        return tc.attach(device, obj.program(PROGRAM).fd, tc.EGRESS, handle=_TC_HANDLE, priority=_TC_PRIORITY,
                         netns=ns)


def remove_pins(prefix: str) -> None:
    shutil.rmtree(pin_dir(prefix), ignore_errors=True)


@dataclass(frozen=True)
class EncapConfig:
    """What rr_encap_cfg holds: per family, the inner destinations wrapped in GRE (the VIPs' prefix) and
    the outer source (the router's address on V)."""

    service_net: ipaddress.IPv4Network
    src: ipaddress.IPv4Address
    service6_net: ipaddress.IPv6Network
    src6: ipaddress.IPv6Address

    def pack(self) -> bytes:
        return CFG.pack(self.service_net.network_address.packed, self.service_net.netmask.packed, self.src.packed,
                        self.service6_net.network_address.packed, self.service6_net.netmask.packed, self.src6.packed)

    @classmethod
    def unpack(cls, raw: bytes) -> EncapConfig:
        net, mask, src, net6, mask6, src6 = CFG.unpack(raw)
        return cls(ipaddress.IPv4Network((net, ipaddress.IPv4Address(mask).compressed)), ipaddress.IPv4Address(src),
                   ipaddress.IPv6Network((net6, _prefixlen6(mask6))), ipaddress.IPv6Address(src6))


def _prefixlen6(mask: bytes) -> int:
    return bin(int.from_bytes(mask, "big")).count("1")


@dataclass(frozen=True)
class RouterMaps:
    """The pinned maps of one lab's router, opened by path for each operation (no fds kept)."""

    pins: Path

    def _fd(self, name: str) -> int:
        return libbpf.obj_get(str(self.pins / name))

    def configure(self, config: EncapConfig) -> None:
        fd = self._fd("rr_encap_cfg")
        try:
            libbpf.map_update(fd, _KEY.pack(0), config.pack())
        finally:
            os.close(fd)

    def config(self) -> EncapConfig:
        """What is currently written (all zeros: nothing yet)."""
        fd = self._fd("rr_encap_cfg")
        try:
            raw = libbpf.map_lookup(fd, _KEY.pack(0), CFG.size) or bytes(CFG.size)
        finally:
            os.close(fd)
        return EncapConfig.unpack(raw)

    def set_endpoints(self, endpoints: dict[str, str]) -> None:
        """IPv6 next hop -> the IPv4 address its tunnels go to (GRE over IPv4); replaces every entry.
        {}: every IPv6 next hop is reached over IPv6."""
        fd = self._fd("rr_encap_endpoints")
        try:
            for key in libbpf.map_keys(fd, ENDPOINT_KEY.size):
                libbpf.map_delete(fd, key)
            for hop, v4 in endpoints.items():
                libbpf.map_update(fd, ENDPOINT_KEY.pack(ipaddress.IPv6Address(hop).packed),
                                  ENDPOINT.pack(ipaddress.IPv4Address(v4).packed))
        finally:
            os.close(fd)

    def endpoints(self) -> dict[str, str]:
        fd = self._fd("rr_encap_endpoints")
        try:
            return {str(ipaddress.IPv6Address(key)): str(ipaddress.IPv4Address(libbpf.map_lookup(fd, key, ENDPOINT.size)))
                    for key in libbpf.map_keys(fd, ENDPOINT_KEY.size)}
        finally:
            os.close(fd)

    def stats(self) -> dict[str, int]:
        fd = self._fd("rr_encap_stats")
        try:
            return {
                name: struct.unpack("=Q", libbpf.map_lookup(fd, _KEY.pack(i), 8) or bytes(8))[0]
                for i, name in enumerate(STATS)
            }
        finally:
            os.close(fd)


def next_hops(ns: str, prefix: str) -> list[str]:
    """The next hops of the kernel's route to exactly `prefix` in ns's main table, in the kernel's
    order; [] when there is no such route. A multipath route (BIRD's merged BGP routes) lists each."""
    net = ipaddress.ip_network(prefix)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    with IPRoute(netns=ns) as ipr:
        routes = [r for r in ipr.get_routes(family=family, table=254)
                  if r["dst_len"] == net.prefixlen and r.get_attr("RTA_DST") == str(net.network_address)]
    hops: list[str] = []
    for r in routes:
        if r.get_attr("RTA_GATEWAY"):
            hops.append(r.get_attr("RTA_GATEWAY"))
        for nh in r.get_attr("RTA_MULTIPATH") or []:
            if nh.get_attr("RTA_GATEWAY"):
                hops.append(nh.get_attr("RTA_GATEWAY"))
    return hops


def _route_query_map(addr: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        {1: ("RTA_DST", addr), 2: ("RTA_SRC", addr), 3: ("RTA_IIF", "uint32"), 27: ("RTA_IP_PROTO", "uint8"),
         28: ("RTA_SPORT", "be16"), 29: ("RTA_DPORT", "be16")}.get(i, (f"RTA_UNUSED{i}", "hex"))
        for i in range(30)
    )


class _RouteQuery(nlmsg):
    """An RTM_GETROUTE request with the L4 fields the multipath hash uses, which pyroute2 0.9's rtmsg
    does not name (include/uapi/linux/rtnetlink.h: RTA_IP_PROTO 27, RTA_SPORT 28, RTA_DPORT 29, the
    ports big-endian). A class of its own, not an rtmsg subclass: pyroute2 caches a compiled attribute
    map on the class, and a subclass made after rtmsg was used would inherit rtmsg's. One per family:
    the addresses' codec is in the map."""

    fields = rtmsg.fields
    nla_map = _route_query_map("ip4addr")


class _RouteQuery6(nlmsg):
    fields = rtmsg.fields
    nla_map = _route_query_map("ip6addr")


def route_choice(ns: str, iif: str, src: str, dst: str, proto: int, sport: int, dport: int) -> str | None:
    """The next hop the kernel picks for this flow arriving on iif (RTM_GETROUTE with the L4 fields, as
    `ip route get DST from SRC iif IF ipproto tcp sport S dport D`, of either family): the same multipath
    hash over the same 5-tuple as the encapsulator's bpf_fib_lookup, so the next hop the flow's GRE goes
    to (for an IPv6 flow, before rr_encap_endpoints maps it). None: no route."""
    return route_choices(ns, iif, src, dst, proto, [sport], dport)[0]


def route_choices(ns: str, iif: str, src: str, dst: str, proto: int, sports: Sequence[int],
                  dport: int) -> list[str | None]:
    """route_choice() for the flows from each of `sports`, asked on one netlink socket of ns (entering a
    namespace costs tens of milliseconds on a loaded box: a test asking for 64 flows one by one took 2.8 s)."""
    with IPRoute(netns=ns) as ipr:
        iif_index = ipr.link_lookup(ifname=iif)[0]
    six = ipaddress.ip_address(dst).version == 6
    # pyroute2 0.9's IPRoute cannot send a message class of our own (nlm_request fails on a missing
    # status key): requests on a netlink socket of ns, coded and decoded by pyroute2's classes.
    hops: list[str | None] = []
    with _pynetns.create_socket(ns, socket.AF_NETLINK, socket.SOCK_RAW, 0) as nl:  # 0: NETLINK_ROUTE
        nl.settimeout(5.0)
        for seq, sport in enumerate(sports, 1):
            query = _RouteQuery6() if six else _RouteQuery()
            query["header"]["type"] = RTM_GETROUTE
            query["header"]["flags"] = NLM_F_REQUEST
            query["header"]["sequence_number"] = seq
            query["family"] = socket.AF_INET6 if six else socket.AF_INET
            query["dst_len"] = query["src_len"] = 128 if six else 32
            query["attrs"] = [("RTA_DST", dst), ("RTA_SRC", src), ("RTA_IIF", iif_index), ("RTA_IP_PROTO", proto),
                              ("RTA_SPORT", sport), ("RTA_DPORT", dport)]
            query.encode()
            nl.send(query.data)
            data = nl.recv(65536)
            if struct.unpack_from("=H", data, 4)[0] == NLMSG_ERROR:
                hops.append(None)  # no route (ENETUNREACH, EHOSTUNREACH): nothing to send the flow to
                continue
            route = rtmsg(data)
            route.decode()
            gateway = route.get_attr("RTA_GATEWAY")
            hops.append(str(gateway) if gateway else None)
    return hops
