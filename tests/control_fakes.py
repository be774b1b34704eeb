"""A fake Dataplane for the control-plane tests: records every apply() and returns canned counters."""

from __future__ import annotations

from ipaddress import IPv4Address

from rusty_rail.control.model import Config, DataplaneState, HealthSpec, HealthType, BackendSpec, ServiceSpec
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import ServiceKey

WEB = ServiceKey.parse("10.1.0.1:80")
DNS = ServiceKey.parse("10.1.0.1:53/udp")
B1, B2, B3 = IPv4Address("10.2.0.1"), IPv4Address("10.2.0.2"), IPv4Address("10.2.0.3")


class FakeDataplane:
    def __init__(self) -> None:
        self.applied: list[DataplaneState] = []
        self.canned: dict[str, object] = {
            "forwarded": 10, "passed": 3, "drop_no_service": 2, "drop_no_backend": 0,
            "connections": 5, "connection_evictions": 1, "table_rebuilds": 4,
            "backends": {(WEB, B1): (7, 700), (WEB, B2): (3, 300)},
            "flows": {B1: 4, B2: 1},
        }
        self.fail_next = False
        self.explained: list[FlowKey] = []

    def apply(self, state: DataplaneState) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("map update failed")
        self.applied.append(state)

    @property
    def last(self) -> dict:
        state = self.applied[-1]
        return {k: dict(v) for k, v in state.services.items()} if state.services is not None else {"open": dict(state.open_backends)}

    def counters(self) -> dict[str, object]:
        return dict(self.canned)

    def explain(self, key: FlowKey) -> tuple[IPv4Address | None, str]:
        self.explained.append(key)
        return B1, "table slot 42"


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
