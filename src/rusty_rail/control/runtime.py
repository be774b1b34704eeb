"""The control plane's runtime around an engine: health checks, the control socket, metrics, reloads, and
the delivery self-check (selfcheck.py: a warning when the device refuses what the engine sends).

    runtime = ControlRuntime(config, engine, config_path="/etc/rusty-rail/config.toml")
    runtime.start()                # the engine has its state; health, socket and metrics run
    ...                            # the daemon runs engine.serve(stop) meanwhile
    runtime.stop()

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

from rusty_rail.control.config import Config, ConfigError, load_config
from rusty_rail.control.health import HealthChecker
from rusty_rail.control.metrics import MetricsServer
from rusty_rail.control.plane import ControlError, ControlPlane
from rusty_rail.control.selfcheck import DeliveryCheck
from rusty_rail.control.socket_server import Commands, ControlServer
from rusty_rail.dataplane import Engine

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
        self.plane = ControlPlane(config, engine, on_targets=self.checker.set_targets)
        self.server = (
            ControlServer(config.control_socket, Commands(self.plane, self.reload if config_path else None))
            if config.control_socket
            else None
        )
        self.metrics = MetricsServer.from_address(config.metrics, self.plane) if config.metrics else None
        self.delivery = DeliveryCheck(engine, config.device)
        self._reload_lock = threading.Lock()
        self._reload_wanted = threading.Event()
        self._closing = threading.Event()
        self._reloader: threading.Thread | None = None

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
        except BaseException:
            self.stop()
            raise
        self._reloader = threading.Thread(target=self._reload_loop, name="rr-reload", daemon=True)
        self._reloader.start()
        self.delivery.start()

    def stop(self) -> None:
        self._closing.set()
        self._reload_wanted.set()
        self.delivery.stop()
        self.checker.stop()
        if self.server is not None:
            self.server.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self._reloader is not None:
            self._reloader.join(5)

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
