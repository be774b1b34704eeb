"""Runs one balancer: the engine, the control plane around it, and the process's signals.

Both configuration forms arrive here as one `Config` (services only). The order matters:

1. the engine is chosen (one log line says which and why) and the control plane gives it its state;
2. the control socket and the metrics endpoint start: a taken port fails here, with nothing attached;
3. the engine takes the device (rings opened / program attached) and serves until stopped.

Signals: SIGTERM/SIGINT stop (the device is let go, everything cleaned up); with [bgp] the stop is a
drain first: the VIPs are withdrawn and the daemon waits until their traffic stops arriving (or
[bgp] drain_timeout) before letting go; a second SIGTERM/SIGINT stops at once. SIGHUP reloads the file;
SIGUSR2 hands over where the engine can (XDP: the program stays attached with its connection table
pinned below RR_PIN_ROOT for the next daemon, the BGP speaker held with its routes announced) and is a
plain stop where it has nothing to leave running (AF_PACKET); an XDP engine that cannot pin logs why and
serves on. `rusty-rail restart` asks through the control socket instead and gets an answer
(control/handover.py); either way the daemon stops only after the pins are in place, and the program
stays attached.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

from rusty_rail.control.config import Config
from rusty_rail.control.handover import HealthRecord
from rusty_rail.control.runtime import ControlRuntime
from rusty_rail.dataplane import Engine, EngineError, EngineReport
from rusty_rail.engines import create_engine

log = logging.getLogger("rusty_rail.daemon")

HANDOVER_EXIT = 75
"""Exit status after a handover (EX_TEMPFAIL: "start me again"); the systemd unit restarts on it."""


def run(config: Config, config_path: str | None = None, engine: Engine | None = None,
        carried_health: Sequence[HealthRecord] = ()) -> int:
    """Run the balancer until a signal stops it; the process's exit status. `engine`: one made already
    (tests); by default the one `config.engine` names. `carried_health`: the health records a
    predecessor handed over (`rusty-rail restart`)."""
    why = "given"
    if engine is None:
        try:
            engine, why = create_engine(config.engine, config.engine_options())
        except EngineError as exc:
            log.error("%s", exc, extra={"event": "engine_failed"})
            return 1
    log.info("engine %s on %s: %s", engine.kind.value, config.device, why,
             extra={"event": "engine", "engine": engine.kind.value})
    stop = threading.Event()
    try:
        # Applies the services to the engine; a handover (control socket or SIGUSR2) ends in stop.set().
        runtime = ControlRuntime(config, engine, config_path, carried_health=carried_health,
                                 on_handed_over=stop.set)
        runtime.start()
    except (OSError, ValueError) as exc:  # the control socket in use, the metrics port taken, ...
        log.error("%s", exc, extra={"event": "control_failed"})
        engine.close()
        return 1

    draining = threading.Event()

    def planned_stop() -> None:
        if not runtime.drains_before_stop or draining.is_set():
            stop.set()  # no routes to withdraw, or a second signal: stop now
            return
        draining.set()
        _in_thread("rr-drain", lambda: (runtime.drain(cancel=stop), stop.set()))

    handlers = {signal.SIGTERM: lambda *_: planned_stop(), signal.SIGINT: lambda *_: planned_stop(),
                signal.SIGHUP: lambda *_: runtime.request_reload(),
                signal.SIGUSR2: lambda *_: runtime.request_handover()}
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        try:
            engine.start()
        except EngineError as exc:
            log.error("%s", exc, extra={"event": "engine_failed"})
            return 1
        log.info("serving %d services on %s (pid %d)", len(config.services), config.device, os.getpid(),
                 extra={"event": "started", "device": config.device, "engine": engine.kind.value})
        report = engine.serve(stop)
    finally:
        runtime.stop()
        engine.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _log_stopped(report)
    return HANDOVER_EXIT if report.handed_over else 0


def _in_thread(name: str, work: Any) -> None:
    threading.Thread(target=work, name=name, daemon=True).start()


def _log_stopped(report: EngineReport) -> None:
    """One line a supervisor or test can parse: what this run did, in the same words for every engine."""
    c = report.counters
    log.info("stopped%s", " (handed over)" if report.handed_over else "", extra={
        "event": "stopped", "engine": report.engine.value, "handover": report.handed_over,
        "counters": {"forwarded": c.forwarded, "forwarded_ipv6": c.forwarded_ipv6, "passed": c.passed,
                     **{f"drop_{k}": v for k, v in c.drops.items()},
                     "connections": c.connections, "connection_evictions": c.connection_evictions},
        "engine_counters": dict(c.engine),
    })
