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

With [bgp] the runtime also runs the BGP announcer (bgp.py, speaker.py): the VIPs are announced while
the engine forwards and their services have backends; `drain()` withdraws them and waits for the traffic
to stop before a planned stop; a handover freezes them and holds the speaker for the next daemon, so the
routes stay announced across a hitless restart (handover.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from rusty_rail.control.bgp import Announcer
from rusty_rail.control.config import Config, ConfigError, load_config
from rusty_rail.control.handover import DaemonHandover, HealthRecord, carried_for
from rusty_rail.control.health import HealthChecker, HealthState
from rusty_rail.control.metrics import MetricsServer
from rusty_rail.control.plane import ControlError, ControlPlane
from rusty_rail.control.selfcheck import DeliveryCheck
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
        *,
        carried_health: Sequence[HealthRecord] = (),
        on_handed_over: Callable[[], None] = lambda: None,
    ) -> None:
        """`carried_health`: a predecessor's health records (restart); `on_handed_over`: called once a
        handover is done (the daemon's stop)."""
        self.config_path = config_path
        self.checker = checker if checker is not None else HealthChecker(on_change=self._health_changed, clock=clock)
        self.engine = engine
        self.bgp = _announcer(config, engine) if config.bgp is not None else None
        self._carried = carried_for(carried_health, config)
        self.plane = ControlPlane(config, engine, on_targets=self.checker.set_targets,
                                  health={k: (r.up, r.reason) for k, r in self._carried.items()},
                                  on_change=self.bgp.kick if self.bgp is not None else None)
        if self.bgp is not None:
            self.bgp.routes = self.plane.route_view
        if self._carried:
            log.info("health carried over from the predecessor: %d backends, %d of them down", len(self._carried),
                     sum(not r.up for r in self._carried.values()), extra={"event": "health_carried"})
        self.handover = DaemonHandover(engine, self.health_records, on_handed_over, config.pin_root, routes=self.bgp)
        self.server = (
            ControlServer(config.control_socket,
                          Commands(self.plane, self.reload if config_path else None, self.handover, self.bgp))
            if config.control_socket
            else None
        )
        self.metrics = MetricsServer.from_address(config.metrics, self.plane, self.bgp) if config.metrics else None
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
            if self.bgp is not None:
                self.bgp.start()
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
        if self.bgp is not None:
            self.bgp.close(handover=self.handover.handed_over)
        if self._worker is not None:
            self._worker.join(5)

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


def _arrived(engine: Engine) -> int:
    """GRE packets the engine has handled: forwarded or dropped with a reason."""
    counters = engine.counters()
    return counters.forwarded + sum(counters.drops.values())


def _announcer(config: Config, engine: Engine) -> Announcer:
    """The BGP announcer for config.bgp; the router id defaults to the device's address, which is also
    the sessions' local address (and so the IPv4 routes' next hop). The IPv6 routes' next hop is the
    device's first global IPv6 address: a configuration announcing an IPv6 VIP on a device without one
    is refused here, before anything starts."""
    from pathlib import Path

    from rusty_rail.dataplane import EngineError
    from rusty_rail.engines.neighbours import device_info

    spec = config.bgp
    assert spec is not None
    try:
        info = device_info(config.device)
    except EngineError as exc:
        raise ValueError(f"bgp: {exc}") from None
    address = info.address
    if address is None:
        raise ValueError(f"bgp: device {config.device!r} has no IPv4 address (the sessions' local address)")
    announced6 = [s.key.vip for s in config.services if s.key.vip is not None and s.key.vip.version == 6
                  and s.route.announce]
    if announced6 and info.address6 is None:
        raise ValueError(f"bgp: device {config.device!r} has no global IPv6 address, the next hop of IPv6 VIP "
                         f"{announced6[0]}'s route (add one, or set announce = false on its services)")
    if config.control_socket is None:
        raise ValueError("bgp: needs control_socket (the speaker's files live next to it)")
    run_dir = Path(f"{config.control_socket}.bgp")
    router_id = spec.router_id or address

    def make_speaker(announcer: Announcer) -> Speaker:
        return Speaker(spec, router_id, address, run_dir, announcer.on_connect, announcer.on_event)

    return Announcer(spec, routes=lambda: [], ready=lambda: engine.ready, make_speaker=make_speaker,
                     next_hop6=info.address6)
