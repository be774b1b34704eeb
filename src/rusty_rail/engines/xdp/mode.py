"""How the XDP program attaches to a device (native or generic), decided in one place, per device.

    choice = attach_mode(options)     # AttachChoice("native" | "skb", why, warning)

`xdp_mode = native | generic` is honoured as asked. `auto` looks at the device (engines/device.py):

- a veth whose peer runs an XDP program in driver mode: native;
- a veth whose peer runs none, or cannot be seen: generic (skb) mode. Native XDP_TX on a veth hands
  frames to the peer's XDP receive ring, which exists only while the peer runs a native XDP program;
  without one the device drops every frame (measured: 0 of 1000 arrived, each in the device's
  tx_dropped) though the program sent them (XDP_TX). Generic mode sends through the ordinary
  transmit path and delivers with nothing on the peer. It costs no more here. bench/veth_xdp_modes.py,
  all CPU per delivered frame (sender included; 84-byte GRE, random flows, the daemon at 50 kpps;
  medians of 3 rounds in one run) relative to the bare MAC-swap XDP_TX program attached natively with
  XDP_PASS on the peer (3.5 us): generic with nothing on the peer 1.09x, native with the peer's XDP_PASS
  1.21x, generic with it 1.23x (the peer's own XDP receive path is most of the difference), the
  AF_PACKET engine 3.48x; all delivered 100%, native with nothing on the peer 0%. So generic XDP rather
  than AF_PACKET; native where the peer's program makes it deliver (it costs the same as generic there);
- any other device: native (the driver's mode; generic is the slow fallback of drivers without it).

Forcing native on a veth whose peer runs nothing is allowed, with a warning: the loss then shows as
tx_refused drops (the engine reads the device), never as forwarded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from rusty_rail.dataplane import EngineOptions, XdpMode
from rusty_rail.engines.device import DeviceFacts, device_facts

__all__ = ["AttachChoice", "GENERIC", "NATIVE", "attach_mode", "decide"]

NATIVE = "native"
GENERIC = "skb"
"""XdpProgram.attach's names of the modes: the driver's own, or generic (skb) mode."""


@dataclass(frozen=True)
class AttachChoice:
    mode: str
    """NATIVE or GENERIC."""
    why: str
    """In words, for the one start-up log line."""
    warning: str | None = None
    """Set when the mode asked for will lose frames on this device (logged as a warning at attach)."""


def decide(requested: XdpMode, facts: DeviceFacts | None, unknown: str = "") -> AttachChoice:
    """The attach mode for a device with these facts (None: they could not be read, `unknown` says why)."""
    if requested == XdpMode.GENERIC:
        return AttachChoice(GENERIC, "generic (skb) mode asked for (xdp_mode = generic)")
    if facts is not None and facts.is_veth:
        peer = facts.peer
        assert peer is not None
        if peer.unseen:
            problem = f"a veth whose peer cannot be seen ({peer.unseen})"
        elif not peer.xdp_prog_id:
            problem = f"a veth whose peer {peer.where} runs no XDP program"
        else:
            problem = ""
        if requested == XdpMode.NATIVE:
            warning = (f"xdp_mode = native on {facts.name}, {problem}: the device will drop every frame the "
                       f"program sends back out (counted as tx_refused drops, not as forwarded); xdp_mode = "
                       f"auto or generic delivers them") if problem else None
            return AttachChoice(NATIVE, "native mode asked for (xdp_mode = native)", warning)
        if problem:
            return AttachChoice(GENERIC, f"generic (skb) mode: {facts.name} is {problem}, where native XDP_TX "
                                         f"would drop every frame; generic delivers, at no more cost "
                                         f"(bench/veth_xdp_modes.py)")
        return AttachChoice(NATIVE, f"native mode: {facts.name} is a veth whose peer {peer.where} runs XDP "
                                    f"program {peer.xdp_prog_id}, so XDP_TX reaches it")
    if requested == XdpMode.NATIVE:
        return AttachChoice(NATIVE, "native mode asked for (xdp_mode = native)")
    if facts is None:
        return AttachChoice(NATIVE, f"native mode (the device's kind could not be read: {unknown})")
    what = f"a {facts.kind} device" if facts.kind else "not a veth: its driver's own XDP"
    return AttachChoice(NATIVE, f"native mode ({facts.name} is {what})")


def attach_mode(options: EngineOptions, device: str | None = None,
                facts_of: Callable[[str], DeviceFacts] = device_facts) -> AttachChoice:
    """The attach mode for `device` (default options.device) in this thread's namespace, and why."""
    device = device or options.device
    if options.xdp_mode == XdpMode.GENERIC:
        return decide(options.xdp_mode, None)
    try:
        facts: DeviceFacts | None = facts_of(device)
        unknown = ""
    except (LookupError, OSError, NetlinkError) as exc:
        facts, unknown = None, str(exc)
    return decide(options.xdp_mode, facts, unknown)
