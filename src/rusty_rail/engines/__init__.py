"""The engines: AF_PACKET (TPACKET_V3 rings, pure Python) and XDP (a C program in the kernel).

Both implement `rusty_rail.dataplane.Engine` and make the same decisions byte for byte (docs/WIRE.md);
`create_engine` picks one for the configured kind and says why, in words for the one start-up log line.
Engines never import the control plane.
"""

from __future__ import annotations

from rusty_rail.dataplane import Engine, EngineError, EngineKind, EngineOptions

__all__ = ["choose_engine", "create_engine"]


def choose_engine(kind: EngineKind, options: EngineOptions) -> tuple[EngineKind, str]:
    """The engine to run for `kind` and why. Raises EngineError when XDP is asked for and cannot run."""
    if kind == EngineKind.AFPACKET:
        return EngineKind.AFPACKET, "engine afpacket asked for"
    from rusty_rail.engines.xdp import xdp_available

    available, why = xdp_available(options)
    if kind == EngineKind.XDP:
        if not available:
            raise EngineError(f"engine xdp was asked for but XDP cannot run here: {why}")
        return EngineKind.XDP, f"engine xdp asked for; {why}"
    if available:
        return EngineKind.XDP, f"auto: {why}"
    return EngineKind.AFPACKET, f"auto: XDP unavailable ({why}), using AF_PACKET rings"


def create_engine(kind: EngineKind, options: EngineOptions) -> tuple[Engine, str]:
    """An engine for the device in `options`, not started yet, and why it was chosen."""
    chosen, why = choose_engine(kind, options)
    if chosen == EngineKind.XDP:
        from rusty_rail.engines.xdp import XdpEngine

        return XdpEngine(options), why
    from rusty_rail.engines.afpacket import AfPacketEngine

    return AfPacketEngine(options), why
