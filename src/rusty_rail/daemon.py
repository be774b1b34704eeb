"""Runs one balancer: picks the engine, builds the balancer, runs the control plane around it.

Both configuration forms end here as a `Config`: the environment form (RR_DEVICE, RR_TARGET_IPS) is
open mode, every GRE packet balanced; a config file lists services and nothing else is balanced.

Signals: SIGTERM/SIGINT stop (the XDP program is detached, everything cleaned up); SIGHUP reloads the
file; SIGUSR2 hands over (XDP engine): the daemon exits with HANDOVER_EXIT, its program still attached
and its connection table pinned in the device's handover directory (xdp_engine.handover_dir, below
RR_PIN_ROOT, default /sys/fs/bpf/rusty_rail), for the next daemon on the device to take over without a
gap (`rusty-rail restart`). The AF_PACKET engine has nothing to leave running: SIGUSR2 is a plain stop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from rusty_rail.config import EngineKind
from rusty_rail.control.model import Config
from rusty_rail.core.balancer import Balancer
from rusty_rail.core.conntrack import DEFAULT_CAPACITY, ConnectionTable

log = logging.getLogger("rusty_rail.daemon")

HANDOVER_EXIT = 75
"""Exit status after a handover (EX_TEMPFAIL: "start me again"); the systemd unit restarts on it."""


def pin_root() -> str:
    from rusty_rail.engines.xdp_engine import HANDOVER_ROOT

    return os.environ.get("RR_PIN_ROOT", "").strip() or HANDOVER_ROOT


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
            raise RuntimeError(f"engine xdp was asked for but XDP cannot run here: {why}")
        return EngineKind.XDP, "engine xdp asked for"
    if available:
        return EngineKind.XDP, f"auto: {why}"
    return EngineKind.AFPACKET, f"auto: XDP unavailable ({why}), using AF_PACKET rings"


def balancer_factory(config: Config) -> Callable[[], Balancer]:
    """Builds an empty balancer for the device; the control plane gives it its backends."""
    from rusty_rail.engines.neighbours import device_info

    _, mac, address = device_info(config.device)
    services = config.open_mode_backends is None

    def make() -> Balancer:
        table = ConnectionTable(config.connection_capacity or DEFAULT_CAPACITY)
        return Balancer(address, mac, table_size=config.table_size, services=services, connections=table)

    return make


def run_with_config(config: Config, config_path: str | None = None) -> int:
    from rusty_rail.control.daemon_runner import run_config
    from rusty_rail.engines.neighbours import DeviceError

    try:
        factory = balancer_factory(config)
        kind, why = choose_engine(EngineKind(config.engine))
    except (DeviceError, RuntimeError) as exc:
        log.error("%s", exc)
        return 1
    log.info("engine %s on %s: %s", kind.value, config.device, why, extra={"event": "engine", "engine": kind.value})
    engine: Any
    stop = threading.Event()
    if kind == EngineKind.XDP:
        from rusty_rail.engines.xdp_dataplane import XdpDataplane
        from rusty_rail.engines.xdp_engine import handover_dir

        engine = XdpDataplane(config.device, factory, handover_dir=handover_dir(config.device, pin_root()))
        serve = engine.serve

        def handover() -> None:
            engine.engine.request_handover()
            stop.set()
    else:
        from rusty_rail.engines.afpacket import AfPacketEngine

        if config.workers == 1:  # the balancer lives in this process; the control plane changes it directly
            engine = AfPacketEngine(config.device, factory(), 1)
        else:  # each forked worker builds its own; the control plane reaches them over pipes
            engine = AfPacketEngine(config.device, None, config.workers, factory=factory)
        serve = engine.run

        def handover() -> None:  # nothing to leave running: a plain stop
            log.warning("SIGUSR2: a handover needs the XDP engine; stopping")
            stop.set()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGUSR2, lambda *_: handover()) if main_thread else None
    try:
        result = run_config(config, engine, serve, config_path=config_path, stop=stop)
    except OSError as exc:  # the control socket in use, the metrics port taken, ...
        log.error("%s", exc)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGUSR2, previous)
    handed_over = kind == EngineKind.XDP and engine.engine.handed_over
    if kind == EngineKind.XDP:
        counters, engine_stats = result, {}
    else:
        counters = result.balancer
        engine_stats = {k: v for k, v in vars(result).items() if k != "balancer"}
    # One line a supervisor or test can parse: what this run did, in the same words for both engines.
    print(json.dumps({"event": "stopped", "engine": kind.value, "handover": handed_over, "counters": counters,
                      "engine_stats": engine_stats}), flush=True)
    return HANDOVER_EXIT if handed_over else 0
