"""The engines: AF_PACKET (TPACKET_V3 rings, pure Python) and XDP (a C program in the kernel).

Both implement `rusty_rail.dataplane.Engine` and make the same decisions byte for byte (docs/WIRE.md);
`create_engine` picks one for the configured kind and says why, in words for the one start-up log line:
which engine, and for XDP which attach mode and why (xdp/mode.py: on a veth whose peer runs no XDP
program, generic mode, since native XDP_TX would drop every frame there). Engines never import the
control plane.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rusty_rail.dataplane import Engine, EngineError, EngineKind, EngineOptions

if TYPE_CHECKING:  # the XDP package is imported only when XDP is considered
    from rusty_rail.engines.xdp import AttachChoice
    from rusty_rail.engines.xdp.hook import HookPlan

__all__ = ["choose_engine", "create_engine"]


def _choose(kind: EngineKind, options: EngineOptions) -> tuple[EngineKind, str, AttachChoice | None, HookPlan | None]:
    """(engine, why, the XDP attach choice or None, how the XDP program takes the device's hook or None).
    Raises EngineError when XDP is asked for and cannot run, and when the device runs someone else's XDP
    program that cannot be shared (engines/xdp/hook.py): before anything is started or touched."""
    if kind == EngineKind.AFPACKET:
        return EngineKind.AFPACKET, "engine afpacket asked for", None, None
    from rusty_rail.engines.xdp import attach_mode, xdp_available
    from rusty_rail.engines.xdp.hook import plan_device_hook

    available, why = xdp_available(options)
    if kind == EngineKind.XDP and not available:
        raise EngineError(f"engine xdp was asked for but XDP cannot run here: {why}")
    if not available:
        return EngineKind.AFPACKET, f"auto: XDP unavailable ({why}), using AF_PACKET rings", None, None
    choice = attach_mode(options)
    hook = plan_device_hook(options, choice.mode)
    asked = "engine xdp asked for" if kind == EngineKind.XDP else "auto"
    return EngineKind.XDP, f"{asked}; {why}; {choice.why}{'; ' + hook.why if hook else ''}", choice, hook


def choose_engine(kind: EngineKind, options: EngineOptions) -> tuple[EngineKind, str]:
    """The engine to run for `kind` and why (for XDP: in which attach mode, and why). Raises EngineError
    when XDP is asked for and cannot run."""
    chosen, why, _, _ = _choose(kind, options)
    return chosen, why


def create_engine(kind: EngineKind, options: EngineOptions) -> tuple[Engine, str]:
    """An engine for the device in `options`, not started yet, and why it was chosen."""
    chosen, why, choice, hook = _choose(kind, options)
    if chosen == EngineKind.XDP:
        from rusty_rail.engines.xdp import XdpEngine

        return XdpEngine(options, attach=choice, hook=hook), why
    from rusty_rail.engines.afpacket import AfPacketEngine

    return AfPacketEngine(options), why
