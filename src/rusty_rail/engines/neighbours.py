"""Next-hop MACs for backends, from the kernel's routing and neighbour tables (rtnetlink via pyroute2).

The engine writes frames itself, so the kernel never resolves neighbours for it. For each backend, of
either family: route lookup (gateway, or the backend itself when directly connected) -> neighbour entry
on our device. When the entry is missing or not usable, we ask the kernel to resolve it with an
RTM_NEWNEIGH carrying NTF_USE: the kernel then behaves as if it had a packet to send (an ARP request for
IPv4, a neighbour solicitation for IPv6 (RFC 4861 7.2); INCOMPLETE -> REACHABLE), and our next refresh
finds the MAC. We never write a MAC into the table ourselves.

Our own transmissions never confirm a neighbour, so REACHABLE entries decay to STALE; STALE is still a
usable MAC, but we also send NTF_USE for it so the kernel re-probes (DELAY -> PROBE) and notices a backend
whose MAC changed.

The same route lookup gives the MTU of the path toward the backend when the route sets one (RTA_METRICS'
RTAX_MTU: `ip route add ... mtu N`, or a path MTU the kernel learnt): the engines answer "too big" by
it (docs/WIRE.md section 8b).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from rusty_rail.core.address import Address, as_address
from rusty_rail.dataplane import EngineError

NTF_USE = 0x01
NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NUD_VALID = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT
NUD_FRESH = NUD_REACHABLE | NUD_NOARP | NUD_PERMANENT | NUD_DELAY | NUD_PROBE  # no nudge needed
IFA_F_DADFAILED = 0x08
RT_SCOPE_UNIVERSE = 0


class DeviceError(EngineError):
    """The data-plane device is missing or unusable (no Ethernet address, no IP address, or none of a
    backend's family): an engine cannot start there, and the message names the device for the operator."""


class NeighbourSink(Protocol):
    def set_neighbour(self, backend: int, mac: bytes | None, mtu: int | None = None) -> None: ...


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine needs of its device (docs/WIRE.md section 8)."""

    ifindex: int
    mac: bytes
    address: IPv4Address | None
    """The first IPv4 address the kernel lists (the primary one): the outer source toward IPv4 backends."""
    address6: IPv6Address | None
    """The first global IPv6 address the kernel lists (not one whose duplicate address detection
    failed): the outer source toward IPv6 backends."""
    mtu: int

    def check_backends(self, backends: Iterable[int], device: str) -> None:
        """DeviceError naming the device and a backend whose family it has no address of."""
        for backend in sorted(backends):
            address = as_address(backend)
            if address.version == 6 and self.address6 is None:
                raise DeviceError(f"device {device!r} has no global IPv6 address, and backend {address} is IPv6 "
                                  "(add one: it is the outer source toward IPv6 backends)")
            if address.version == 4 and self.address is None:
                raise DeviceError(f"device {device!r} has no IPv4 address, and backend {address} is IPv4 "
                                  "(add one: it is the outer source toward IPv4 backends)")


def device_info(device: str, ipr: IPRoute | None = None) -> DeviceInfo:
    """The ifindex, MAC, addresses and MTU of `device` in the current network namespace. DeviceError
    when it does not exist, has no Ethernet address, or has neither an IPv4 nor a global IPv6 address."""
    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        links = ipr.link_lookup(ifname=device)
        if not links:
            raise DeviceError(f"device {device!r} does not exist in this network namespace")
        ifindex = links[0]
        link = ipr.get_links(ifindex)[0]
        mac = link.get_attr("IFLA_ADDRESS")
        if not mac or len(_mac(mac)) != 6:
            raise DeviceError(f"device {device!r} has no Ethernet address")
        address = address6 = None
        for msg in ipr.get_addr(family=socket.AF_INET, index=ifindex):
            local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if local:
                address = IPv4Address(local)
                break
        for msg in ipr.get_addr(family=socket.AF_INET6, index=ifindex):
            flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
            local = msg.get_attr("IFA_ADDRESS")
            if local and msg["scope"] == RT_SCOPE_UNIVERSE and not flags & IFA_F_DADFAILED:
                address6 = IPv6Address(local)
                break
        if address is None and address6 is None:
            raise DeviceError(f"device {device!r} has no IPv4 and no global IPv6 address")
        return DeviceInfo(ifindex, _mac(mac), address, address6, link.get_attr("IFLA_MTU") or 1500)
    finally:
        if own:
            ipr.close()


class NeighbourResolver:
    """Resolves backends' next-hop MACs on one device; keeps one rtnetlink socket open."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.ipr = IPRoute()
        try:
            self.info = device_info(device, self.ipr)
        except BaseException:
            self.ipr.close()
            raise
        self.ifindex, self.mac = self.info.ifindex, self.info.mac
        self.address, self.address6, self.mtu = self.info.address, self.info.address6, self.info.mtu
        self.known: dict[int, tuple[bytes | None, int | None]] = {}
        """Last answer per backend (MAC, route MTU), so refresh() only calls set_neighbour on a change."""
        self.route_mtus: dict[int, int] = {}
        """Backends whose route sets an MTU, as the last lookup found it."""
        self.unroutable: set[int] = set()
        """Backends whose route leaves through another device (we can only send out of ours)."""

    def next_hop(self, backend: int) -> Address | None:
        """The address whose MAC we need: the route's gateway (an IPv6 one is often link-local), or the
        backend on a connected subnet. The family of the route follows the backend's."""
        target = as_address(backend)
        try:
            routes = self.ipr.route("get", dst=str(target))
        except NetlinkError:
            return None
        if not routes:
            return None
        route = routes[0]
        if route.get_attr("RTA_OIF") != self.ifindex or route.get("type", 1) != 1:  # RTN_UNICAST
            return None
        metrics = route.get_attr("RTA_METRICS")
        mtu = metrics.get_attr("RTAX_MTU") if metrics is not None else None
        if mtu:
            self.route_mtus[backend] = mtu
        else:
            self.route_mtus.pop(backend, None)
        gateway = route.get_attr("RTA_GATEWAY")
        return ip_address(gateway) if gateway else target

    def _lookup(self, hop: Address) -> tuple[bytes | None, int]:
        """(MAC or None, NUD state; 0 if there is no entry)."""
        try:
            entries = self.ipr.neigh("get", dst=str(hop), ifindex=self.ifindex, family=_family(hop))
        except NetlinkError as e:
            if e.code in (errno.ENOENT, errno.ENODEV):
                return None, 0
            raise
        for entry in entries:
            state = entry.get("state", 0)
            lladdr = entry.get_attr("NDA_LLADDR")
            if state & NUD_VALID and lladdr:
                return _mac(lladdr), state
            return None, state
        return None, 0

    def _nudge(self, hop: Address) -> None:
        """Make the kernel (re)resolve `hop`, as if it had a packet for it (NTF_USE)."""
        try:
            self.ipr.neigh("replace", dst=str(hop), ifindex=self.ifindex, flags=NTF_USE, state=0, family=_family(hop))
        except NetlinkError:
            pass  # e.g. the device went down; the next refresh tries again

    def resolve(self, backend: int) -> bytes | None:
        """The next-hop MAC for `backend`, or None (then resolution has been started; ask again later)."""
        hop = self.next_hop(backend)
        if hop is None:
            self.unroutable.add(backend)
            return None
        self.unroutable.discard(backend)
        mac, state = self._lookup(hop)
        if not state & NUD_FRESH:
            self._nudge(hop)  # absent, INCOMPLETE, FAILED, or STALE (usable, but re-verify)
        return mac

    def refresh(self, backends: Iterable[int], sink: NeighbourSink) -> int:
        """Resolve every backend; call sink.set_neighbour for each answer (MAC, route MTU) that changed.
        Returns changes."""
        changes = 0
        wanted = set(backends)
        for backend in wanted:
            answer = (self.resolve(backend), self.route_mtus.get(backend))
            if backend not in self.known or self.known[backend] != answer:
                self.known[backend] = answer
                sink.set_neighbour(backend, *answer)
                changes += 1
        for gone in set(self.known) - wanted:
            del self.known[gone]
        return changes

    def close(self) -> None:
        self.ipr.close()


def _family(address: Address) -> int:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET
