"""The lab router's GRE encapsulator (bpf/router_encap.c): load, attach, its maps, and the kernel
routes it follows.

The program is loaded by this process through libbpf with its maps pinned under a directory of the
lab's own (<DEFAULT_PIN_ROOT>/<prefix>router/), so two labs with different prefixes never share them;
other processes (`lab status`) open the maps there. The program itself needs no pin: the tc filter
holds it. Where GRE goes is not in a map: it is the next hop of the router's kernel route to the inner
destination (BIRD's ECMP route to a VIP), which next_hops() and route_choice() read through netlink.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import struct
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
MAPS = ("rr_encap_cfg", "rr_encap_stats")
CFG = struct.Struct("=4s4s4s")  # struct rr_encap_cfg: service_net, service_mask, src (network order)
# enum rr_encap_stat, in order. "encapsulated" counts skbs (a GSO super-packet once); compare a
# balancer's "forwarded" (wire packets) with "encapsulated_wire".
STATS = ("encapsulated", "no_route", "no_neigh", "no_gateway", "room_fail", "encapsulated_wire")
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


def _addr(a: str) -> bytes:
    return ipaddress.IPv4Address(a).packed


@dataclass(frozen=True)
class RouterMaps:
    """The pinned maps of one lab's router, opened by path for each operation (no fds kept)."""

    pins: Path

    def _fd(self, name: str) -> int:
        return libbpf.obj_get(str(self.pins / name))

    def configure(self, service_net: str, src: str) -> None:
        """Which inner destinations are wrapped in GRE (the VIPs' prefix), and the outer source."""
        net = ipaddress.IPv4Network(service_net)
        fd = self._fd("rr_encap_cfg")
        try:
            libbpf.map_update(fd, _KEY.pack(0), CFG.pack(net.network_address.packed, net.netmask.packed, _addr(src)))
        finally:
            os.close(fd)

    def config(self) -> tuple[str, str]:
        """(service prefix, outer source) as currently written."""
        fd = self._fd("rr_encap_cfg")
        try:
            raw = libbpf.map_lookup(fd, _KEY.pack(0), CFG.size) or bytes(CFG.size)
        finally:
            os.close(fd)
        net, mask, src = CFG.unpack(raw)
        prefix = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(net)}/{ipaddress.IPv4Address(mask)}")
        return str(prefix), str(ipaddress.IPv4Address(src))

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


class _RouteQuery(nlmsg):
    """An RTM_GETROUTE request with the L4 fields the multipath hash uses, which pyroute2 0.9's rtmsg
    does not name (include/uapi/linux/rtnetlink.h: RTA_IP_PROTO 27, RTA_SPORT 28, RTA_DPORT 29, the
    ports big-endian). A class of its own, not an rtmsg subclass: pyroute2 caches a compiled attribute
    map on the class, and a subclass made after rtmsg was used would inherit rtmsg's."""

    fields = rtmsg.fields
    nla_map = tuple(
        {1: ("RTA_DST", "ip4addr"), 2: ("RTA_SRC", "ip4addr"), 3: ("RTA_IIF", "uint32"), 27: ("RTA_IP_PROTO", "uint8"),
         28: ("RTA_SPORT", "be16"), 29: ("RTA_DPORT", "be16")}.get(i, (f"RTA_UNUSED{i}", "hex"))
        for i in range(30)
    )


def route_choice(ns: str, iif: str, src: str, dst: str, proto: int, sport: int, dport: int) -> str | None:
    """The next hop the kernel picks for this flow arriving on iif (RTM_GETROUTE with the L4 fields, as
    `ip route get DST from SRC iif IF ipproto tcp sport S dport D`): the same multipath hash over the same
    5-tuple as the encapsulator's bpf_fib_lookup, so the address the flow's GRE goes to. None: no route."""
    with IPRoute(netns=ns) as ipr:
        iif_index = ipr.link_lookup(ifname=iif)[0]
    query = _RouteQuery()
    query["header"]["type"] = RTM_GETROUTE
    query["header"]["flags"] = NLM_F_REQUEST
    query["header"]["sequence_number"] = 1
    query["family"] = socket.AF_INET
    query["dst_len"] = query["src_len"] = 32
    query["attrs"] = [("RTA_DST", dst), ("RTA_SRC", src), ("RTA_IIF", iif_index), ("RTA_IP_PROTO", proto),
                      ("RTA_SPORT", sport), ("RTA_DPORT", dport)]
    query.encode()
    # pyroute2 0.9's IPRoute cannot send a message class of our own (nlm_request fails on a missing
    # status key): one request on a netlink socket of ns, coded and decoded by pyroute2's classes.
    with _pynetns.create_socket(ns, socket.AF_NETLINK, socket.SOCK_RAW, 0) as nl:  # 0: NETLINK_ROUTE
        nl.settimeout(5.0)
        nl.send(query.data)
        data = nl.recv(65536)
    if struct.unpack_from("=H", data, 4)[0] == NLMSG_ERROR:
        return None  # no route (ENETUNREACH, EHOSTUNREACH): nothing to send the flow to
    route = rtmsg(data)
    route.decode()
    gateway = route.get_attr("RTA_GATEWAY")
    return str(gateway) if gateway else None
