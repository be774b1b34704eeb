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

__all__ = ["choose_engine", "create_engine"]


def _choose(kind: EngineKind, options: EngineOptions) -> tuple[EngineKind, str, AttachChoice | None]:
    """(engine, why, the XDP attach choice or None)."""
    if kind == EngineKind.AFPACKET:
        return EngineKind.AFPACKET, "engine afpacket asked for", None
    from rusty_rail.engines.xdp import attach_mode, xdp_available

    available, why = xdp_available(options)
    if kind == EngineKind.XDP:
        if not available:
            raise EngineError(f"engine xdp was asked for but XDP cannot run here: {why}")
        choice = attach_mode(options)
        return EngineKind.XDP, f"engine xdp asked for; {why}; {choice.why}", choice
    if available:
        choice = attach_mode(options)
        return EngineKind.XDP, f"auto: {why}; {choice.why}", choice
    return EngineKind.AFPACKET, f"auto: XDP unavailable ({why}), using AF_PACKET rings", None


def choose_engine(kind: EngineKind, options: EngineOptions) -> tuple[EngineKind, str]:
    """The engine to run for `kind` and why (for XDP: in which attach mode, and why). Raises EngineError
    when XDP is asked for and cannot run."""
    chosen, why, _ = _choose(kind, options)
    return chosen, why


def create_engine(kind: EngineKind, options: EngineOptions) -> tuple[Engine, str]:
    """An engine for the device in `options`, not started yet, and why it was chosen."""
    chosen, why, choice = _choose(kind, options)
    if chosen == EngineKind.XDP:
        from rusty_rail.engines.xdp import XdpEngine

        return XdpEngine(options, attach=choice), why
    from rusty_rail.engines.afpacket import AfPacketEngine

    return AfPacketEngine(options), why
