"""Next-hop MACs for backends, from the kernel's routing and neighbour tables (rtnetlink via pyroute2).

The engine writes frames itself, so the kernel never resolves neighbours for it. For each backend:
route lookup (gateway, or the backend itself when directly connected) -> neighbour entry on our device.
When the entry is missing or not usable, we ask the kernel to resolve it with an RTM_NEWNEIGH carrying
NTF_USE: the kernel then behaves as if it had a packet to send (ARP probe, INCOMPLETE -> REACHABLE), and
our next refresh finds the MAC. We never write a MAC into the table ourselves.

Our own transmissions never confirm a neighbour, so REACHABLE entries decay to STALE; STALE is still a
usable MAC, but we also send NTF_USE for it so the kernel re-probes (DELAY -> PROBE) and notices a backend
whose MAC changed.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable
from typing import Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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


class DeviceError(EngineError):
    """The data-plane device is missing or unusable (no Ethernet or IPv4 address): an engine cannot
    start there, and the message names the device for the operator."""


class NeighbourSink(Protocol):
    def set_neighbour(self, backend: int, mac: bytes | None) -> None: ...


def _ip(n: int) -> str:
    return str(ipaddress.IPv4Address(n))


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def device_info(device: str, ipr: IPRoute | None = None) -> tuple[int, bytes, int]:
    """(ifindex, MAC, first IPv4 address as int) of `device` in the current network namespace.

    "First" is the first address the kernel lists for the device, i.e. its primary address: the
    balancer's outer source address (docs/WIRE.md section 8).
    """
    own = ipr is None
    ipr = ipr or IPRoute()
    try:
        links = ipr.link_lookup(ifname=device)
        if not links:
            raise DeviceError(f"device {device!r} does not exist in this network namespace")
        ifindex = links[0]
        link = ipr.get_links(ifindex)[0]
        address = link.get_attr("IFLA_ADDRESS")
        if not address or len(_mac(address)) != 6:
            raise DeviceError(f"device {device!r} has no Ethernet address")
        for msg in ipr.get_addr(family=socket.AF_INET, index=ifindex):
            local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if local:
                return ifindex, _mac(address), int(ipaddress.IPv4Address(local))
        raise DeviceError(f"device {device!r} has no IPv4 address")
    finally:
        if own:
            ipr.close()


class NeighbourResolver:
    """Resolves backends' next-hop MACs on one device; keeps one rtnetlink socket open."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.ipr = IPRoute()
        try:
            self.ifindex, self.mac, self.address = device_info(device, self.ipr)
        except BaseException:
            self.ipr.close()
            raise
        self.known: dict[int, bytes | None] = {}
        """Last answer per backend, so refresh() only calls set_neighbour on a change."""
        self.unroutable: set[int] = set()
        """Backends whose route leaves through another device (we can only send out of ours)."""

    def next_hop(self, backend: int) -> int | None:
        """The address whose MAC we need: the route's gateway, or the backend on a connected subnet."""
        try:
            routes = self.ipr.route("get", dst=_ip(backend))
        except NetlinkError:
            return None
        if not routes:
            return None
        route = routes[0]
        if route.get_attr("RTA_OIF") != self.ifindex or route.get("type", 1) != 1:  # RTN_UNICAST
            return None
        gateway = route.get_attr("RTA_GATEWAY")
        return int(ipaddress.IPv4Address(gateway)) if gateway else backend

    def _lookup(self, hop: int) -> tuple[bytes | None, int]:
        """(MAC or None, NUD state; 0 if there is no entry)."""
        try:
            entries = self.ipr.neigh("get", dst=_ip(hop), ifindex=self.ifindex)
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

    def _nudge(self, hop: int) -> None:
        """Make the kernel (re)resolve `hop`, as if it had a packet for it (NTF_USE)."""
        try:
            self.ipr.neigh("replace", dst=_ip(hop), ifindex=self.ifindex, flags=NTF_USE, state=0)
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
        """Resolve every backend; call sink.set_neighbour for each answer that changed. Returns changes."""
        changes = 0
        wanted = set(backends)
        for backend in wanted:
            mac = self.resolve(backend)
            if backend not in self.known or self.known[backend] != mac:
                self.known[backend] = mac
                sink.set_neighbour(backend, mac)
                changes += 1
        for gone in set(self.known) - wanted:
            del self.known[gone]
        return changes

    def close(self) -> None:
        self.ipr.close()
