"""Health checks: from the balancer to each backend's address, per service.

`HealthState` is the rule (sans-I/O): `rise` passes in a row bring a backend up, `fall` failures in a row
take it down. `HealthChecker` schedules probes with a clock it is given, runs them on a small thread
pool, feeds results to the states and reports transitions to a callback; `tick(now)` is the whole
schedule, so tests drive it with a fake clock and a fake probe and never sleep.

A backend starts UP (assumed healthy) and leaves after `fall` failures; after a hitless restart it
starts in the state its predecessor's checks had reached (control/handover.py). Starting down and waiting for
`rise` passes would make every restart or reload blackhole the service for rise*interval seconds; the
original balancer had no checks at all, so "up until shown otherwise" is also the compatible choice
(keepalived's default for a real server is the same).
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

from rusty_rail.control.config import HealthSpec, HealthType
from rusty_rail.core.address import Address
from rusty_rail.core.service import ServiceKey

log = logging.getLogger("rusty_rail.health")

Probe = Callable[["Target"], "str | None"]
"""Runs one check; returns None on success, else a short reason ('connection refused')."""
OnChange = Callable[[ServiceKey, Address, bool, str], None]
"""(service, backend, up, reason) on every transition."""


@dataclass
class HealthState:
    """Consecutive-result counting, as keepalived and most load balancers do it."""

    rise: int
    fall: int
    up: bool = True
    successes: int = 0
    failures: int = 0
    checks: int = 0
    last_error: str | None = None

    def record(self, ok: bool, error: str | None = None) -> bool:
        """Count one result; True when `up` changed."""
        self.checks += 1
        if ok:
            self.failures = 0
            self.successes += 1
            self.last_error = None
            if not self.up and self.successes >= self.rise:
                self.up = True
                return True
        else:
            self.successes = 0
            self.failures += 1
            self.last_error = error
            if self.up and self.failures >= self.fall:
                self.up = False
                return True
        return False


@dataclass(frozen=True)
class Target:
    """One (service, backend) to check, with the port resolved (HealthSpec.port 0 = the service's)."""

    service: ServiceKey
    backend: Address
    spec: HealthSpec

    @property
    def port(self) -> int:
        return self.spec.port or self.service.port


def probe(target: Target) -> str | None:
    """The real check: a TCP connect, or an HTTP GET that must answer 2xx or 3xx, within the timeout."""
    spec = target.spec
    address = str(target.backend)
    try:
        if spec.type == HealthType.TCP:
            with socket.create_connection((address, target.port), timeout=spec.timeout):
                return None
        if spec.type == HealthType.HTTP:
            conn = http.client.HTTPConnection(address, target.port, timeout=spec.timeout)
            try:
                conn.request("GET", spec.path, headers={"User-Agent": "rusty-rail-health", "Connection": "close"})
                status = conn.getresponse().status
            finally:
                conn.close()
            return None if 200 <= status < 400 else f"HTTP {status}"
        return None
    except TimeoutError:
        return f"no answer within {spec.timeout}s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    except http.client.HTTPException as exc:
        return f"bad HTTP answer ({type(exc).__name__})"


@dataclass
class _Entry:
    target: Target
    state: HealthState
    due: float
    in_flight: bool = False
    generation: int = 0


@dataclass
class HealthChecker:
    """Checks every target on its interval; `on_change` hears each up/down transition."""

    on_change: OnChange
    clock: Callable[[], float]
    probe: Probe = probe
    executor: Executor | None = None
    """Where probes run; default a pool of `max_workers` threads, created on first use."""
    max_workers: int = 8
    _entries: dict[tuple[ServiceKey, Address], _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _generation: int = 0

    # -- what to check ---------------------------------------------------------------------------

    def set_targets(self, targets: Iterable[Target],
                    carried: Mapping[tuple[ServiceKey, Address], HealthState] | None = None) -> None:
        """Check exactly these. A target that stays with the same spec keeps its state (a reload or a
        runtime change does not reset health); a new one starts up, or in its `carried` state (a
        restart's), and is probed at once."""
        carried = carried or {}
        now = self.clock()
        with self._lock:
            wanted = {(t.service, t.backend): t for t in targets if t.spec.type != HealthType.NONE}
            entries: dict[tuple[ServiceKey, Address], _Entry] = {}
            for key, target in wanted.items():
                old = self._entries.get(key)
                if old is not None and old.target == target:
                    entries[key] = old
                else:
                    self._generation += 1
                    state = carried.get(key) or HealthState(target.spec.rise, target.spec.fall)
                    entries[key] = _Entry(target, dataclasses.replace(state), now, generation=self._generation)
            self._entries = entries
        self._wake.set()

    def state(self, service: ServiceKey, backend: Address) -> HealthState | None:
        with self._lock:
            entry = self._entries.get((service, backend))
            return None if entry is None else entry.state

    def snapshot(self) -> list[tuple[Target, HealthState]]:
        """Every target with a copy of its state, as of now."""
        with self._lock:
            return [(e.target, dataclasses.replace(e.state)) for e in self._entries.values()]

    # -- the schedule ----------------------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Start every probe that is due; returns when the next one is due (None: nothing to check)."""
        due: list[_Entry] = []
        with self._lock:
            for entry in self._entries.values():
                if not entry.in_flight and entry.due <= now:
                    entry.in_flight = True
                    # From the start of this probe: timeout <= interval, so probes never overlap.
                    entry.due = now + entry.target.spec.interval
                    due.append(entry)
            # An entry in flight is due again at its `due` too: its probe ends by then (timeout <= interval).
            next_due = min((e.due for e in self._entries.values()), default=None)
        for entry in due:
            self._executor().submit(self._run, entry.target, entry.generation)
        return next_due

    def _executor(self) -> Executor:
        if self.executor is None:
            self.executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="rr-health")
        return self.executor

    def _run(self, target: Target, generation: int) -> None:
        try:
            error = self.probe(target)
        except Exception as exc:  # a broken probe is a failed check, never a dead checker
            error = f"probe failed: {exc}"
        self.report(target, generation, error)

    def report(self, target: Target, generation: int, error: str | None) -> None:
        """A probe's result. Results for a target removed or changed meanwhile are ignored."""
        with self._lock:
            entry = self._entries.get((target.service, target.backend))
            if entry is None or entry.generation != generation:
                return
            entry.in_flight = False
            changed = entry.state.record(error is None, error)
            up = entry.state.up
            count = entry.state.successes if up else entry.state.failures
        if changed:
            reason = f"{count} checks passed" if up else f"{count} checks failed, last: {error}"
            log.warning(
                "backend %s of %s is %s: %s", target.backend, target.service, "up" if up else "down", reason,
                extra={"service": str(target.service), "backend": str(target.backend), "up": up},
            )
            self.on_change(target.service, target.backend, up, reason)
        self._wake.set()

    # -- the thread ------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rr-health", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            next_due = self.tick(self.clock())
            wait = 1.0 if next_due is None else min(1.0, max(0.0, next_due - self.clock()))
            self._wake.wait(wait)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
