"""The dataplane interface: the state the control plane wants, and the `Engine` protocol every engine
implements. Only `rusty_rail.core` lies below it; engines implement it, the control plane drives it."""

from rusty_rail.dataplane.engine import (
    Counters,
    Engine,
    EngineError,
    EngineKind,
    EngineOptions,
    EngineReport,
    Explanation,
    XdpMode,
    default_workers,
)
from rusty_rail.dataplane.state import DataplaneState, StateBuilder

__all__ = [
    "Counters",
    "DataplaneState",
    "Engine",
    "EngineError",
    "EngineKind",
    "EngineOptions",
    "EngineReport",
    "Explanation",
    "StateBuilder",
    "XdpMode",
    "default_workers",
]
