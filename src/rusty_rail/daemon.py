"""Runs one balancer: picks the engine, builds the balancer, serves until SIGTERM/SIGINT."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from rusty_rail.config import EngineKind, EnvConfig
from rusty_rail.core.balancer import Balancer

log = logging.getLogger("rusty_rail.daemon")


def choose_engine(requested: EngineKind) -> tuple[EngineKind, str]:
    """The engine to run and why, in words for the one log line that says so."""
    if requested == EngineKind.AFPACKET:
        return EngineKind.AFPACKET, "RR_ENGINE=afpacket"
    try:
        from rusty_rail.engines.xdp_engine import xdp_available
    except ImportError as exc:
        available, why = False, f"XDP engine not installed ({exc})"
    else:
        available, why = xdp_available()
    if requested == EngineKind.XDP:
        if not available:
            raise RuntimeError(f"RR_ENGINE=xdp but XDP cannot run here: {why}")
        return EngineKind.XDP, "RR_ENGINE=xdp"
    if available:
        return EngineKind.XDP, f"auto: XDP loads here ({why})"
    return EngineKind.AFPACKET, f"auto: XDP unavailable ({why}), using AF_PACKET rings"


def balancer_factory(config: EnvConfig) -> Callable[[], Balancer]:
    from rusty_rail.engines.neighbours import device_info

    _, mac, address = device_info(config.device)

    def make() -> Balancer:
        return Balancer(address, mac, config.targets, table_size=config.table_size)

    return make


def run_balancer(config: EnvConfig) -> int:
    from rusty_rail.engines.neighbours import DeviceError

    try:
        factory = balancer_factory(config)
        kind, why = choose_engine(config.engine)
    except (DeviceError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1
    log.info("engine %s on %s: %s; backends %s", kind.value, config.device, why, ", ".join(map(str, config.targets)))
    if kind == EngineKind.XDP:
        from rusty_rail.engines.xdp_engine import XdpEngine

        counters = XdpEngine(config.device, factory).serve_forever()
        engine_stats: dict[str, object] = {}
    else:
        from rusty_rail.engines.afpacket import AfPacketEngine

        engine = AfPacketEngine(config.device, None if config.workers > 1 else factory(), config.workers, factory=factory)
        stats = engine.serve_forever()
        counters = stats.balancer
        engine_stats = {k: v for k, v in vars(stats).items() if k != "balancer"}
    # One line a supervisor or test can parse: what this run did, in the same words for both engines.
    print(json.dumps({"event": "stopped", "engine": kind.value, "counters": counters, "engine_stats": engine_stats}), flush=True)
    return 0
