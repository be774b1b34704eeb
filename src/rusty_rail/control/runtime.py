"""The control plane's runtime around an engine: health checks, the control socket, metrics, reloads, and
the delivery self-check (selfcheck.py: a warning when the device refuses what the engine sends).

    runtime = ControlRuntime(config, engine, config_path="/etc/rusty-rail/config.toml")
    runtime.start()                # the engine has its state; health, socket and metrics run
    ...                            # the daemon runs engine.serve(stop) meanwhile
    runtime.stop()

A reload (SIGHUP, `ctl reload`) and a handover asked for by SIGUSR2 are done by a thread of its own:
reading the file, building tables or pinning maps must not run inside a signal handler that interrupted
the packet loop (which may hold the engine's lock). The daemon (rusty_rail/daemon.py) installs the signal
handlers and owns the process; this class owns nothing but control-plane threads.

A restarted daemon gets its predecessor's health records (handover.py) as `carried_health`: backends
the checks had found down start down, and every check keeps its count of passes and failures.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from rusty_rail.control.config import Config, ConfigError, load_config
from rusty_rail.control.handover import DaemonHandover, HealthRecord, carried_for
from rusty_rail.control.health import HealthChecker, HealthState
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
        *,
        carried_health: Sequence[HealthRecord] = (),
        on_handed_over: Callable[[], None] = lambda: None,
    ) -> None:
        """`carried_health`: a predecessor's health records (restart); `on_handed_over`: called once a
        handover is done (the daemon's stop)."""
        self.config_path = config_path
        self.checker = checker if checker is not None else HealthChecker(on_change=self._health_changed, clock=clock)
        self._carried = carried_for(carried_health, config)
        self.plane = ControlPlane(config, engine, on_targets=self.checker.set_targets,
                                  health={k: (r.up, r.reason) for k, r in self._carried.items()})
        if self._carried:
            log.info("health carried over from the predecessor: %d backends, %d of them down", len(self._carried),
                     sum(not r.up for r in self._carried.values()), extra={"event": "health_carried"})
        self.handover = DaemonHandover(engine, self.health_records, on_handed_over, config.pin_root)
        self.server = (
            ControlServer(config.control_socket,
                          Commands(self.plane, self.reload if config_path else None, self.handover))
            if config.control_socket
            else None
        )
        self.metrics = MetricsServer.from_address(config.metrics, self.plane) if config.metrics else None
        self.delivery = DeliveryCheck(engine, config.device)
        self._reload_lock = threading.Lock()
        self._requests: queue.SimpleQueue[str] = queue.SimpleQueue()  # put() is safe in a signal handler
        self._worker: threading.Thread | None = None

    def _health_changed(self, service: Any, backend: Any, up: bool, reason: str) -> None:
        self.plane.set_health(service, backend, up, reason)

    def start(self) -> None:
        self.checker.set_targets(self.plane.targets(), carried={
            key: HealthState(r.check.rise, r.check.fall, up=r.up, successes=r.successes, failures=r.failures)
            for key, r in self._carried.items()})
        self.checker.start()
        try:
            if self.server is not None:
                self.server.start()
            if self.metrics is not None:
                self.metrics.start()
        except BaseException:
            self.stop()
            raise
        self._worker = threading.Thread(target=self._request_loop, name="rr-requests", daemon=True)
        self._worker.start()
        self.delivery.start()

    def stop(self) -> None:
        self._requests.put("close")
        self.delivery.stop()
        self.checker.stop()
        if self.server is not None:
            self.server.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self._worker is not None:
            self._worker.join(5)

    # -- what signals ask for ----------------------------------------------------------------------

    def request_reload(self) -> None:
        """Safe from a signal handler: only queues the request."""
        self._requests.put("reload")

    def request_handover(self) -> None:
        """SIGUSR2; safe from a signal handler: only queues the request (handover.py, from_signal)."""
        self._requests.put("handover")

    def _request_loop(self) -> None:
        while (request := self._requests.get()) != "close":
            if request == "handover":
                self.handover.from_signal()
                continue
            try:
                self.reload()
            except ControlError:
                pass  # logged by reload(); the running configuration stays

    def health_records(self) -> list[HealthRecord]:
        """Every checked backend's state, for a successor (handover.py)."""
        reasons = self.plane.health_reasons()
        return [HealthRecord(target.service, target.backend, target.spec, state.up,
                             reasons.get((target.service, target.backend), ""), state.successes, state.failures)
                for target, state in self.checker.snapshot()]

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
