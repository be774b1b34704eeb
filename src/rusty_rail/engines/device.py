"""What the kernel says about the balancer's device: its kind, its veth peer's XDP, the frames it refused.

Through rtnetlink (pyroute2) and SIOCETHTOOL (pyroute2's IoctlEthtool), never by parsing a tool's output.

- `device_facts(device)`: the link's kind (IFLA_LINKINFO / IFLA_INFO_KIND: "veth", "bridge", ...; none
  for a physical NIC) and, for a veth, its peer: IFLA_LINK is the peer's ifindex in the namespace that
  IFLA_LINK_NETNSID names (absent: ours), looked up there with RTM_GETLINK + IFLA_TARGET_NETNSID (pyroute2
  still calls it IFLA_IF_NETNSID), and whether the peer runs an XDP program in driver mode (its IFLA_XDP).
  Engine auto's attach mode is decided from these (engines/xdp/mode.py).
- `TxRefusals`: frames the device refused to transmit since the engine started. Measured on veth here
  (bench/veth_xdp_modes.py, kernel 6.18): native XDP_TX towards a peer without XDP drops every frame
  and counts each once in the device's tx_dropped (IFLA_STATS64; the same figure as ethtool's
  rx_queue_N_xdp_tx_errors); in generic mode and for AF_PACKET, a frame veth_xmit cannot hand to its
  peer is counted there too. Other drivers count XDP TX errors in their own ethtool statistics
  (mlx5 "tx_xdp_err", virtio_net "rx_queue_N_xdp_tx_drops", ...): for them those are added.
  tx_dropped is the device's: a frame of the host's own that the device refused is in it too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pyroute2 import IPRoute
from pyroute2.ethtool.ioctl import EthtoolError, IoctlEthtool
from pyroute2.netlink.exceptions import NetlinkError

__all__ = ["DeviceFacts", "PeerFacts", "TxRefusals", "device_facts", "xdp_tx_error_stat"]


class LinkSource(Protocol):
    """What device_facts needs of an rtnetlink socket (pyroute2's IPRoute; tests pass a fake)."""

    def link(self, command: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class PeerFacts:
    """The other end of a veth, as far as this namespace can see it."""

    ifindex: int
    netnsid: int | None
    """The peer's namespace as ours numbers it; None: the same namespace."""
    name: str | None = None
    """None when the peer could not be looked up (`unseen` says why)."""
    xdp_prog_id: int = 0
    """The XDP program it runs in driver (native) mode; 0: none. A generic-mode program does not count:
    only a native one gives the peer the receive ring native XDP_TX from our side needs."""
    unseen: str = ""

    @property
    def where(self) -> str:
        name = self.name or f"ifindex {self.ifindex}"
        return name if self.netnsid is None else f"{name} in netns id {self.netnsid}"


@dataclass(frozen=True)
class DeviceFacts:
    name: str
    ifindex: int
    kind: str | None
    """IFLA_INFO_KIND: "veth", "bridge", "vxlan", ...; None for a device without one (a NIC's driver)."""
    peer: PeerFacts | None = None
    """A veth's peer; None for any other kind."""

    @property
    def is_veth(self) -> bool:
        return self.kind == "veth"


def _first(answer: Any) -> Any:
    messages = list(answer)
    if not messages:
        raise LookupError("no answer")
    return messages[0]


def _nested(message: Any, name: str, inner: str) -> Any:
    attr = message.get_attr(name)
    return attr.get_attr(inner) if attr is not None else None


def native_xdp_prog_id(message: Any) -> int:
    """The driver-mode XDP program of a link (its IFLA_XDP), 0 for none."""
    xdp = message.get_attr("IFLA_XDP")
    if xdp is None:
        return 0
    drv = xdp.get_attr("IFLA_XDP_DRV_PROG_ID")
    if drv:
        return int(drv)
    if xdp.get_attr("IFLA_XDP_ATTACHED") == "xdp":  # XDP_ATTACHED_DRV: one program, in driver mode
        return int(xdp.get_attr("IFLA_XDP_PROG_ID") or 0)
    return 0


def _peer(ipr: LinkSource, ifindex: int, netnsid: int | None) -> PeerFacts:
    try:
        if netnsid is None:
            message = _first(ipr.link("get", index=ifindex))
        else:
            message = _first(ipr.link("get", index=ifindex, IFLA_IF_NETNSID=netnsid))
    except (NetlinkError, OSError, LookupError) as exc:
        return PeerFacts(ifindex, netnsid, unseen=f"looking it up failed: {exc}")
    return PeerFacts(ifindex, netnsid, message.get_attr("IFLA_IFNAME"), native_xdp_prog_id(message))


def device_facts(device: str, ipr: LinkSource | None = None) -> DeviceFacts:
    """The facts of `device` in this thread's network namespace. Raises LookupError when it does not exist."""
    own = ipr is None
    source: Any = IPRoute() if ipr is None else ipr
    try:
        try:
            message = _first(source.link("get", ifname=device))
        except NetlinkError as exc:
            raise LookupError(f"device {device!r}: {exc}") from None
        kind = _nested(message, "IFLA_LINKINFO", "IFLA_INFO_KIND")
        facts = DeviceFacts(device, message["index"], kind)
        if kind != "veth":
            return facts
        link = message.get_attr("IFLA_LINK")
        if not link:
            return DeviceFacts(device, facts.ifindex, kind, PeerFacts(0, None, unseen="the kernel names no peer"))
        return DeviceFacts(device, facts.ifindex, kind, _peer(source, link, message.get_attr("IFLA_LINK_NETNSID")))
    finally:
        if own:
            source.close()


def xdp_tx_error_stat(name: str) -> bool:
    """Whether an ethtool statistic of a driver counts XDP frames it failed to transmit."""
    n = name.lower()
    return "xdp" in n and "tx" in n and any(word in n for word in ("err", "drop", "fail"))


class TxRefusals:
    """Frames `device` refused to transmit since this object was made (module docstring: which counters).

    Keeps one rtnetlink socket (and, for drivers other than veth, one ethtool socket) of the namespace
    it was made in, so read() may come from any thread of the process; close() releases them."""

    def __init__(self, device: str, ipr: Any = None, ethtool_of: Callable[[str], Any] | None = None) -> None:
        """`ipr`: an rtnetlink socket to use (and close); `ethtool_of(device)`: an ethtool handle with
        get_statistics() and close() (default pyroute2's IoctlEthtool). Tests pass fakes."""
        self.device = device
        self._ipr = ipr if ipr is not None else IPRoute()
        self._lock = threading.Lock()
        self._closed = False
        self._ethtool: Any = None
        try:
            kind = _nested(_first(self._ipr.link("get", ifname=device)), "IFLA_LINKINFO", "IFLA_INFO_KIND")
            if kind != "veth":  # veth folds its XDP TX errors into tx_dropped (measured, module docstring)
                self._ethtool = (ethtool_of or IoctlEthtool)(device)
            self._last = 0
            self._start = self._raw()
        except BaseException:
            self.close()
            raise

    def _raw(self) -> int:
        message = _first(self._ipr.link("get", ifname=self.device))
        stats = message.get_attr("IFLA_STATS64")
        total = int(stats["tx_dropped"]) if stats is not None else 0
        if self._ethtool is not None:
            try:
                total += sum(int(v) for k, v in self._ethtool.get_statistics() if xdp_tx_error_stat(k))
            except (OSError, EthtoolError):
                pass  # a driver without ethtool statistics: tx_dropped is all there is
        return total

    def read(self) -> int:
        """Refused since start; the last figure when the device cannot be read now (it went away).
        Never decreases: a device whose counters restarted (re-created) starts a new baseline."""
        with self._lock:
            if self._closed:
                return self._last
            try:
                raw = self._raw()
            except (NetlinkError, OSError, LookupError):
                return self._last
            if raw - self._start < self._last:  # the counters went backwards: a re-created device
                self._start = raw - self._last
            self._last = raw - self._start
            return self._last

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ipr.close()
            if self._ethtool is not None:
                self._ethtool.close()
