"""A fake Engine for the control-plane tests: records every apply() and returns canned counters."""

from __future__ import annotations

import threading
from ipaddress import IPv4Address

from rusty_rail.control.config import BackendSpec, Config, HealthSpec, HealthType, ServiceSpec
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import ServiceKey
from rusty_rail.dataplane import Counters, DataplaneState, EngineError, EngineKind, EngineReport, Explanation

WEB = ServiceKey.parse("10.1.0.1:80")
DNS = ServiceKey.parse("10.1.0.1:53/udp")
B1, B2, B3 = IPv4Address("10.2.0.1"), IPv4Address("10.2.0.2"), IPv4Address("10.2.0.3")


class FakeEngine:
    kind = EngineKind.AFPACKET

    def __init__(self) -> None:
        self.applied: list[DataplaneState] = []
        self.canned = Counters(
            forwarded=10, passed=3, drops={"no_service": 2, "no_backend": 0}, connections=5, connection_evictions=1,
            backends={(WEB, B1): (7, 700), (WEB, B2): (3, 300)}, flows={(WEB, B1): 4, (WEB, B2): 1, (DNS, B1): 2},
            ready=True, forwarded_ipv6=4, connections_ipv6=2,
        )
        self.fail_next = False
        self.explained: list[FlowKey] = []
        self.pinned: list[str] = []
        self.handover_error: str | None = None

    def apply(self, state: DataplaneState) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("map update failed")
        self.applied.append(state)

    @property
    def last(self) -> dict[ServiceKey, dict[IPv4Address, int]]:
        """The last state as {service: {backend: weight}} (weights read back from the tables)."""
        return {s.key: dict(zip(s.table.backends, s.table.weights)) for s in self.applied[-1].services}

    @property
    def ready(self) -> bool:
        return True

    def start(self) -> None:
        pass

    def counters(self, *, walk: bool = True) -> Counters:
        return self.canned

    def explain(self, key: FlowKey) -> Explanation:
        self.explained.append(key)
        return Explanation(B1, "table slot 42")

    def serve(self, stop: threading.Event) -> EngineReport:
        stop.wait()
        return EngineReport(self.kind, False, self.canned)

    def hand_over(self, pin_root: str) -> bool:
        """Records the pin root; `handover_error` set: refuses, as an engine that cannot pin does."""
        if self.handover_error is not None:
            raise EngineError(self.handover_error)
        self.pinned.append(pin_root)
        return True

    def cancel_handover(self) -> None:
        self.pinned.clear()

    def close(self) -> None:
        pass


def two_services(health: HealthType = HealthType.TCP, **overrides: object) -> Config:
    check = HealthSpec(health, port=8080 if health != HealthType.NONE else 0, rise=2, fall=2)
    return Config(
        device="eth0",
        services=(
            ServiceSpec(WEB, (BackendSpec(B1), BackendSpec(B2, 2)), check),
            ServiceSpec(DNS, (BackendSpec(B1),), HealthSpec()),
        ),
        **overrides,  # type: ignore[arg-type]
    )
