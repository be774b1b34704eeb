"""The control plane: configuration + health + runtime changes -> what the data plane serves.

`ControlPlane` owns the runtime state (services, their backends, weights, drain flags, health) and turns
it into a `DataplaneState`, handed to the data plane only when it differs from the last one:

- a backend that is down (health) or removed is left out: its flows are re-hashed, Maglev moves no other;
- a drained backend is listed at weight 0: no new flows, its established flows stay until they end;
- a weight change rebuilds that service's table.

The environment form is one catch-all service like any other (named "*"; "open" is accepted too).
Tables are built by the `StateBuilder` (dataplane/state.py) for the services whose weights changed.

Policies (chosen, so written down):
- Health: backends start up (see health.py), or, after a hitless restart, as the predecessor's checks
  left them (`health`, from control/handover.py). With every backend of a service down the service has none
  and its packets are dropped as NO_BACKEND, as IPVS does with no real servers: visible in the drop
  counters, rather than sending traffic to backends the checks say are dead.
- Reload: the file is the truth for services, backends and weights, so runtime add/remove/weight changes
  not written into the file are gone after a reload. Drains are kept for backends that stay: a drain is
  an operator's maintenance action, and an unrelated reload must not send new flows to a machine being
  worked on. Health state is kept for backends whose check did not change. Fields that need a restart
  (config.RESTART_FIELDS) are reported, not applied.

Every public method takes the lock, so the socket server, the health checker and SIGHUP may call at once.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rusty_rail.control.bgp import ServiceRoute
from rusty_rail.control.config import RESTART_FIELDS, Config, HealthSpec, HealthType, RouteSpec
from rusty_rail.control.health import Target
from rusty_rail.core.address import Address, as_address, with_port
from rusty_rail.core.constants import MAX_WEIGHT
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.options import ServiceOptions
from rusty_rail.core.service import CATCH_ALL_NAME, ServiceKey, ServiceMatcher
from rusty_rail.dataplane import DataplaneState, Engine, StateBuilder

log = logging.getLogger("rusty_rail.control")


class ControlError(Exception):
    """A request that cannot be done; the message is meant for the operator as is."""


@dataclass
class BackendState:
    address: Address
    weight: int
    drained: bool = False
    healthy: bool = True
    health_reason: str = ""

    @property
    def served_weight(self) -> int | None:
        """The weight the data plane gets, or None when the backend is left out."""
        if not self.healthy:
            return None
        return 0 if self.drained else self.weight


@dataclass
class ServiceState:
    key: ServiceKey
    health: HealthSpec
    backends: dict[Address, BackendState] = field(default_factory=dict)
    route: RouteSpec = RouteSpec()
    options: ServiceOptions = ServiceOptions()

    @property
    def name(self) -> str:
        return str(self.key)


def parse_service(text: str) -> ServiceKey:
    """'10.1.0.1:80', '10.1.0.1:80/udp', '10.1.0.1' (every port), '[2001:db8::1]:443', '2001:db8::1', or
    '*' (the catch-all)."""
    try:
        return ServiceKey.parse(text.strip())
    except (ValueError, KeyError):
        raise ControlError(f"{text!r} is not a service (VIP:PORT, VIP:PORT/udp, VIP, [IPv6 VIP]:PORT or "
                           f"{CATCH_ALL_NAME})") from None


def parse_backend(text: str) -> Address:
    try:
        return as_address(text.strip())
    except ValueError:
        raise ControlError(f"{text!r} is not an IPv4 or IPv6 address") from None


HealthKey = tuple[ServiceKey, Address]


def _services_from(config: Config, health: Mapping[HealthKey, tuple[bool, str]] | None = None
                   ) -> dict[ServiceKey, ServiceState]:
    health = health or {}
    services: dict[ServiceKey, ServiceState] = {}
    for spec in config.services:
        state = ServiceState(spec.key, spec.health, route=spec.route, options=spec.options)
        for b in spec.backends:
            healthy, reason = health.get((spec.key, b.address), (True, ""))
            state.backends[b.address] = BackendState(b.address, b.weight, healthy=healthy, health_reason=reason)
        services[spec.key] = state
    return services


class ControlPlane:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        on_targets: Callable[[list[Target]], None] | None = None,
        health: Mapping[HealthKey, tuple[bool, str]] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """Applies the configuration at once. `on_targets` hears the health-check targets on each change;
        `health`: (up, reason) of backends whose state is known already (a restart's), else they start up;
        `on_change` is told after every change the data plane took (BGP re-decides its routes)."""
        self.config = config
        self.engine = engine
        self.on_targets = on_targets
        self.on_change = on_change
        self._lock = threading.RLock()
        self._services = _services_from(config, health)
        self._builder = StateBuilder(config.table_size)
        self._applied: DataplaneState | None = None
        self.applies = 0
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload_error: str | None = None
        self.health_transitions = 0
        self.health_carried = len(health or {})
        """Backends whose health state came from a predecessor (restart)."""
        self._push()

    # -- the data plane's view ---------------------------------------------------------------------

    def dataplane_state(self) -> DataplaneState | None:
        """The state last applied to the engine."""
        with self._lock:
            return self._applied

    @property
    def tables_built(self) -> int:
        return self._builder.tables_built

    def _push(self) -> None:
        """Apply the current state if it changed (caller holds the lock)."""
        state = self._builder.build({
            key: {b.address: w for b in service.backends.values() if (w := b.served_weight) is not None}
            for key, service in self._services.items()
        }, {key: service.options for key, service in self._services.items()})
        if self._applied is not None and state.same_services(self._applied):
            return
        self.engine.apply(state)
        self._applied = state
        self.applies += 1

    def _commit(self, services: dict[ServiceKey, ServiceState], targets_changed: bool) -> None:
        """Make `services` current, or leave everything as it was if the data plane refuses it."""
        old = self._services
        self._services = services
        try:
            self._push()
        except Exception as exc:
            self._services = old
            try:
                self._applied = None
                self._push()
            except Exception:
                log.exception("restoring the previous data-plane state failed")
            raise ControlError(f"the data plane refused the change: {exc}") from exc
        if targets_changed and self.on_targets is not None:
            self.on_targets(self.targets())
        if self.on_change is not None:
            self.on_change()

    def targets(self) -> list[Target]:
        """What the health checker should check: every backend of every service with a check."""
        with self._lock:
            return [
                Target(s.key, b, s.health)
                for s in self._services.values()
                if s.health.type != HealthType.NONE
                for b in s.backends
            ]

    # -- runtime changes (ctl) ---------------------------------------------------------------------

    def _copy(self) -> dict[ServiceKey, ServiceState]:
        return {
            k: ServiceState(s.key, s.health, {a: dataclasses.replace(b) for a, b in s.backends.items()}, s.route,
                            s.options)
            for k, s in self._services.items()
        }

    def _find(self, services: dict[ServiceKey, ServiceState], service: ServiceKey) -> ServiceState:
        found = services.get(service)
        if found is None:
            known = ", ".join(s.name for s in services.values())
            raise ControlError(f"no service {service} (services: {known})")
        return found

    def _backend(self, state: ServiceState, backend: Address) -> BackendState:
        found = state.backends.get(backend)
        if found is None:
            raise ControlError(f"{backend} is not a backend of {state.name}")
        return found

    def add(self, service: ServiceKey, backend: Address, weight: int = 1) -> None:
        _check_weight(weight)
        with self._lock:
            services = self._copy()
            state = self._find(services, service)
            if backend in state.backends:
                raise ControlError(f"{backend} is already a backend of {state.name}")
            state.backends[backend] = BackendState(backend, weight)
            self._commit(services, targets_changed=True)
        log.info("added backend %s to %s (weight %d)", backend, state.name, weight,
                 extra={"service": state.name, "backend": str(backend)})

    def remove(self, service: ServiceKey, backend: Address) -> None:
        with self._lock:
            services = self._copy()
            state = self._find(services, service)
            self._backend(state, backend)
            del state.backends[backend]
            self._commit(services, targets_changed=True)
        log.info("removed backend %s from %s", backend, state.name, extra={"service": state.name, "backend": str(backend)})

    def drain(self, service: ServiceKey, backend: Address, drained: bool = True) -> None:
        with self._lock:
            services = self._copy()
            state = self._find(services, service)
            self._backend(state, backend).drained = drained
            self._commit(services, targets_changed=False)
        log.info("%s backend %s of %s", "drained" if drained else "undrained", backend, state.name,
                 extra={"service": state.name, "backend": str(backend)})

    def undrain(self, service: ServiceKey, backend: Address) -> None:
        self.drain(service, backend, drained=False)

    def set_weight(self, service: ServiceKey, backend: Address, weight: int) -> None:
        _check_weight(weight)
        with self._lock:
            services = self._copy()
            state = self._find(services, service)
            self._backend(state, backend).weight = weight
            self._commit(services, targets_changed=False)
        log.info("weight of %s in %s is %d", backend, state.name, weight, extra={"service": state.name, "backend": str(backend)})

    def set_health(self, service: ServiceKey, backend: Address, up: bool, reason: str = "") -> None:
        """From the health checker. A report for a backend removed meanwhile is ignored."""
        with self._lock:
            current = self._services.get(service)
            if current is None or backend not in current.backends:
                return
            if current.backends[backend].healthy == up:
                current.backends[backend].health_reason = reason
                return
            services = self._copy()
            b = services[service].backends[backend]
            b.healthy, b.health_reason = up, reason
            self.health_transitions += 1
            self._commit(services, targets_changed=False)

    def health_reasons(self) -> dict[HealthKey, str]:
        """Why each backend is up or down, as the last check reported (status shows it too)."""
        with self._lock:
            return {(s.key, b.address): b.health_reason for s in self._services.values() for b in s.backends.values()}

    # -- reload ------------------------------------------------------------------------------------

    def reload(self, config: Config) -> list[str]:
        """Serve the services of `config` (already checked by load_config). Returns notes on fields
        that need a restart. On any failure the running state stays, and ControlError says why."""
        notes = [
            f"{name} changed from {getattr(self.config, name)!r} to {getattr(config, name)!r}: takes effect after a restart"
            for name in RESTART_FIELDS
            if getattr(self.config, name) != getattr(config, name)
        ]
        with self._lock:
            try:
                services = _services_from(config)
                for key, state in services.items():
                    before = self._services.get(key)
                    if before is None:
                        continue
                    for address, backend in state.backends.items():
                        old = before.backends.get(address)
                        if old is None:
                            continue
                        backend.drained = old.drained
                        if before.health == state.health:
                            backend.healthy, backend.health_reason = old.healthy, old.health_reason
                self._commit(services, targets_changed=True)
            except ControlError as exc:
                self.reload_failures += 1
                self.last_reload_error = str(exc)
                raise
            self.config = dataclasses.replace(self.config, services=config.services)
            self.reloads += 1
            self.last_reload_error = None
        return notes

    def note_reload_failure(self, reason: str) -> None:
        """A reload that failed before reaching the plane (the file did not load)."""
        with self._lock:
            self.reload_failures += 1
            self.last_reload_error = reason

    # -- inspection --------------------------------------------------------------------------------

    def route_view(self) -> list[ServiceRoute]:
        """What BGP's rule reads of each service (bgp.wanted_routes)."""
        with self._lock:
            return [ServiceRoute(s.name, s.key.vip, s.route, sum(b.healthy for b in s.backends.values()))
                    for s in self._services.values()]

    def explain(self, flow: FlowKey) -> dict[str, Any]:
        with self._lock:
            matched = ServiceMatcher(self._services).match(flow.packed)
        answer = self.engine.explain(flow)
        return {
            "flow": f"{with_port(flow.src, flow.sport)} -> {with_port(flow.dst, flow.dport)} {_proto_name(flow.protocol)}",
            "service": None if matched is None else matched.name,
            "backend": None if answer.backend is None else str(answer.backend),
            "reason": answer.reason,
        }

    def status(self) -> dict[str, Any]:
        """Everything ctl status, top and the metrics show, JSON-able."""
        with self._lock:
            services = self._copy()
            control = {
                "applies": self.applies,
                "reloads": self.reloads,
                "reload_failures": self.reload_failures,
                "last_reload_error": self.last_reload_error,
                "health_transitions": self.health_transitions,
                "health_carried": self.health_carried,
            }
        counters = self.engine.counters()
        flows = counters.flows or {}
        out_services = []
        for state in services.values():
            checked = state.health.type != HealthType.NONE
            backends: list[dict[str, Any]] = []
            for b in state.backends.values():
                packets, nbytes = counters.backends.get((state.key, b.address), (0, 0))
                backends.append({
                    "address": str(b.address),
                    "weight": b.weight,
                    "drained": b.drained,
                    "health": ("up" if b.healthy else "down") if checked else "unchecked",
                    "health_reason": b.health_reason,
                    "served_weight": b.served_weight,
                    "state": "down" if not b.healthy else "drained" if b.drained or b.weight == 0 else "active",
                    "packets": packets,
                    "bytes": nbytes,
                    "flows": flows.get((state.key, b.address), 0) if counters.flows is not None else None,
                })
            key = state.key
            out_services.append({
                "service": state.name,
                "vip": None if key.vip is None else str(key.vip),
                "protocol": key.protocol.name.lower(),
                "port": key.port,
                "health": {"type": state.health.type.value, **(
                    {k: getattr(state.health, k) for k in ("port", "path", "interval", "timeout", "rise", "fall")}
                    if checked else {})},
                "options": _options_view(state.options),
                "packets": sum(b["packets"] for b in backends),
                "bytes": sum(b["bytes"] for b in backends),
                "backends": backends,
            })
        return {
            "ready": counters.ready,
            "device": self.config.device,
            "engine": self.engine.kind.value,
            "table_size": self.config.table_size,
            "services": out_services,
            "counters": {
                "forwarded": counters.forwarded,
                "by_family": {
                    "ipv4": {"forwarded": counters.forwarded - counters.forwarded_ipv6,
                             "connections": counters.connections - counters.connections_ipv6},
                    "ipv6": {"forwarded": counters.forwarded_ipv6, "connections": counters.connections_ipv6},
                },
                "passed": counters.passed,
                "drops": dict(counters.drops),
                "connections": counters.connections,
                "connection_evictions": counters.connection_evictions,
                "table_rebuilds": self.tables_built,
                "options": dict(counters.options),
            },
            "engine_counters": dict(counters.engine),
            "control": control,
        }


def _check_weight(weight: int) -> None:
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= MAX_WEIGHT:
        raise ControlError(f"weight {weight!r} is not a whole number in 0..{MAX_WEIGHT}")


def _options_view(options: ServiceOptions) -> dict[str, Any]:
    """A service's options as the file writes them (status, ctl)."""
    view: dict[str, Any] = {"hash": options.hash.text, "connection_table": options.connection_table,
                            "answer_ping": options.answer_ping, "quic": options.quic}
    if options.quic:
        view["server_ids"] = {str(as_address(b)): sid for b, sid in options.server_ids}
    return view


def _proto_name(protocol: int) -> str:
    return {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}.get(protocol, f"proto {protocol}")
