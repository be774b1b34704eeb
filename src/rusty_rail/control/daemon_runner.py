"""The daemon around an engine: control plane, health checks, control socket, metrics and signals.

    dataplane, serve = <the lead's engine wiring>
    run_config(config, dataplane, serve, config_path="/etc/rusty-rail/config.toml")

`serve(stop)` runs the engine's packet loop in the calling (main) thread until `stop.is_set()`.
SIGTERM/SIGINT set `stop`; SIGHUP asks for a reload, done by a thread of its own: reading the file and
building tables must not run inside a signal handler that interrupted the packet loop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from rusty_rail.config import ConfigError
from rusty_rail.control.config_file import load_config
from rusty_rail.control.health import HealthChecker
from rusty_rail.control.metrics import MetricsServer
from rusty_rail.control.model import Config, Dataplane
from rusty_rail.control.plane import ControlError, ControlPlane
from rusty_rail.control.socket_server import Commands, ControlServer

log = logging.getLogger("rusty_rail.daemon")

Serve = Callable[[threading.Event], Any]


class Daemon:
    """Everything but the packet loop; start() and stop() bracket it."""

    def __init__(
        self,
        config: Config,
        dataplane: Dataplane,
        config_path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        checker: HealthChecker | None = None,
    ) -> None:
        self.config_path = config_path
        self.checker = checker if checker is not None else HealthChecker(on_change=self._health_changed, clock=clock)
        self.plane = ControlPlane(config, dataplane, on_targets=self.checker.set_targets)
        self.server = (
            ControlServer(config.control_socket, Commands(self.plane, self.reload if config_path else None))
            if config.control_socket
            else None
        )
        self.metrics = MetricsServer.from_address(config.metrics, self.plane) if config.metrics else None
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

    def stop(self) -> None:
        self._closing.set()
        self._reload_wanted.set()
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


def run_config(
    config: Config,
    dataplane: Dataplane,
    serve: Serve,
    config_path: str | None = None,
    install_signals: bool = True,
    stop: threading.Event | None = None,
) -> Any:
    """Run until SIGTERM/SIGINT (or `stop`); returns what `serve` returned. Signals need the main thread."""
    stop = stop if stop is not None else threading.Event()
    daemon = Daemon(config, dataplane, config_path)
    daemon.start()
    previous: dict[int, Any] = {}
    try:
        if install_signals:
            previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: stop.set())
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: stop.set())
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
        what = (
            f"every GRE packet over {len(config.open_mode_backends)} backends"
            if config.open_mode_backends is not None
            else f"{len(config.services)} services"
        )
        log.info(
            "serving %s on %s (pid %d)", what, config.device, os.getpid(),
            extra={"event": "started", "device": config.device, "engine": config.engine},
        )
        return serve(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        daemon.stop()
