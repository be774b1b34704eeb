"""The control plane's runtime around an engine: health checks, the control socket, metrics, reloads.

    runtime = ControlRuntime(config, engine, config_path="/etc/rusty-rail/config.toml")
    runtime.start()                # the engine has its state; health, socket and metrics run
    ...                            # the daemon runs engine.serve(stop) meanwhile
    runtime.stop()

With [bgp] the runtime also runs the BGP announcer (bgp.py, speaker.py): the VIPs are announced while
the engine forwards and their services have backends; `drain()` withdraws them and waits for the traffic
to stop before a planned stop; `prepare_handover()` keeps them announced across a hitless restart.

A reload (SIGHUP, `ctl reload`) is done by a thread of its own: reading the file and building tables must
not run inside a signal handler that interrupted the packet loop. The daemon (rusty_rail/daemon.py)
installs the signal handlers and owns the process; this class owns nothing but control-plane threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from rusty_rail.control.bgp import Announcer
from rusty_rail.control.config import Config, ConfigError, load_config
from rusty_rail.control.health import HealthChecker
from rusty_rail.control.metrics import MetricsServer
from rusty_rail.control.plane import ControlError, ControlPlane
from rusty_rail.control.socket_server import Commands, ControlServer
from rusty_rail.control.speaker import Speaker
from rusty_rail.dataplane import Engine

DRAIN_QUIET_S = 0.5
"""A planned stop's drain ends once no packet for the VIPs arrived for this long (the routers withdrew us)."""

log = logging.getLogger("rusty_rail.control")


class ControlRuntime:
    """Everything but the packet loop; start() and stop() bracket it."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        config_path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        checker: HealthChecker | None = None,
    ) -> None:
        self.config_path = config_path
        self.checker = checker if checker is not None else HealthChecker(on_change=self._health_changed, clock=clock)
        self.engine = engine
        self.bgp = _announcer(config, engine) if config.bgp is not None else None
        self.plane = ControlPlane(config, engine, on_targets=self.checker.set_targets,
                                  on_change=self.bgp.kick if self.bgp is not None else None)
        if self.bgp is not None:
            self.bgp.routes = self.plane.route_view
        self.server = (
            ControlServer(config.control_socket, Commands(self.plane, self.reload if config_path else None, self.bgp))
            if config.control_socket
            else None
        )
        self.metrics = MetricsServer.from_address(config.metrics, self.plane, self.bgp) if config.metrics else None
        self._reload_lock = threading.Lock()
        self._reload_wanted = threading.Event()
        self._closing = threading.Event()
        self._reloader: threading.Thread | None = None
        self._handover = False

    def _health_changed(self, service: Any, backend: Any, up: bool, reason: str) -> None:
        self.plane.set_health(service, backend, up, reason)

    def start(self) -> None:
        self.checker.set_targets(self.plane.targets())
        self.checker.start()
        try:
            if self.server is not None:
                self.server.start()
            if self.metrics is not None:
                self.metrics.start()
            if self.bgp is not None:
                self.bgp.start()
        except BaseException:
            self.stop()
            raise
        self._reloader = threading.Thread(target=self._reload_loop, name="rr-reload", daemon=True)
        self._reloader.start()

    def stop(self) -> None:
        self._closing.set()
        self._reload_wanted.set()
        self.checker.stop()
        if self.server is not None:
            self.server.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.bgp is not None:
            self.bgp.close(handover=self._handover)
        if self._reloader is not None:
            self._reloader.join(5)

    # -- planned stops ----------------------------------------------------------------------------

    @property
    def drains_before_stop(self) -> bool:
        return self.bgp is not None

    def drain(self, cancel: threading.Event | None = None) -> None:
        """Before a planned stop: withdraw every VIP, then wait until no packet for them arrives for
        DRAIN_QUIET_S (the routers have moved the traffic elsewhere), at most [bgp] drain_timeout; `cancel`
        (a second signal) cuts the wait short. The data plane forwards throughout."""
        if self.bgp is None:
            return
        self.bgp.set_stopping()
        timeout = self.bgp.spec.drain_timeout
        started = last_change = time.monotonic()
        seen = _arrived(self.engine)
        while not (cancel is not None and cancel.is_set()):
            now = time.monotonic()
            if now - last_change >= DRAIN_QUIET_S or now - started >= timeout:
                break
            time.sleep(0.05)  # sampling the engine's counters: the wait is bounded by the timeout above
            count = _arrived(self.engine)
            if count != seen:
                seen, last_change = count, time.monotonic()
        quiet = time.monotonic() - last_change >= DRAIN_QUIET_S
        log.info("drained: %s after %.1f s", "traffic stopped" if quiet else "gave up waiting",
                 time.monotonic() - started, extra={"event": "drained", "quiet": quiet,
                                                    "seconds": round(time.monotonic() - started, 2)})

    def freeze_routes(self) -> None:
        """Safe from a signal handler: the announced routes stay as they are (a handover is starting)."""
        if self.bgp is not None:
            self.bgp.freeze()

    def prepare_handover(self) -> None:
        """A hitless restart is coming: keep the routes announced for the next daemon."""
        if self.bgp is not None and self.bgp.hold_for_handover():
            self._handover = True

    # -- reload ------------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Safe from a signal handler: only sets an event."""
        self._reload_wanted.set()

    def _reload_loop(self) -> None:
        while True:
            self._reload_wanted.wait()
            if self._closing.is_set():
                return
            self._reload_wanted.clear()
            try:
                self.reload()
            except ControlError:
                pass  # logged by reload(); the running configuration stays

    def reload(self) -> list[str]:
        """Load the file and apply it atomically; on any error log why and keep the running config."""
        if self.config_path is None:
            raise ControlError("no configuration file to reload")
        with self._reload_lock:
            try:
                config = load_config(self.config_path)
            except ConfigError as exc:
                self.plane.note_reload_failure(str(exc))
                log.error("reload rejected, the running configuration stays: %s", exc, extra={"event": "reload_failed"})
                raise ControlError(str(exc)) from None
            try:
                notes = self.plane.reload(config)
            except ControlError as exc:
                log.error("reload rejected, the running configuration stays: %s", exc, extra={"event": "reload_failed"})
                raise
        for note in notes:
            log.warning("reload: %s", note)
        log.info("reloaded %s: %d services", self.config_path, len(config.services), extra={"event": "reloaded"})
        return notes


def _arrived(engine: Engine) -> int:
    """GRE packets the engine has handled: forwarded or dropped with a reason."""
    counters = engine.counters()
    return counters.forwarded + sum(counters.drops.values())


def _announcer(config: Config, engine: Engine) -> Announcer:
    """The BGP announcer for config.bgp; the router id defaults to the device's address, which is also
    the sessions' local address (and so the routes' next hop)."""
    from ipaddress import IPv4Address
    from pathlib import Path

    from rusty_rail.dataplane import EngineError
    from rusty_rail.engines.neighbours import device_info

    spec = config.bgp
    assert spec is not None
    try:
        address = IPv4Address(device_info(config.device)[2])
    except EngineError as exc:
        raise ValueError(f"bgp: {exc}") from None
    if config.control_socket is None:
        raise ValueError("bgp: needs control_socket (the speaker's files live next to it)")
    run_dir = Path(f"{config.control_socket}.bgp")
    router_id = spec.router_id or address

    def make_speaker(announcer: Announcer) -> Speaker:
        return Speaker(spec, router_id, address, run_dir, announcer.on_connect, announcer.on_event)

    return Announcer(spec, routes=lambda: [], ready=lambda: engine.ready, make_speaker=make_speaker)
