"""The AF_PACKET engine's in-process Balancer (engines/afpacket/local.py) under the real control plane:
health, drain, weights and removal keep flows where the issue says; apply rebuilds only what changed;
counters, explain and the flow-count limit. No rings: frames go straight to decide(), so no root needed.
"""

from __future__ import annotations

import functools
from ipaddress import IPv4Address
from typing import cast

import pytest
from scapy.layers.inet import IP, TCP

from rusty_rail.control.config import BackendSpec, Config, HealthSpec, ServiceSpec
from rusty_rail.control.plane import ControlPlane
from rusty_rail.core.balancer import Balancer
from rusty_rail.core.conntrack import ConnectionTable
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import ServiceKey
from rusty_rail.core.verdict import Drop, DropReason, Pass
from rusty_rail.dataplane import Counters, DataplaneState, Engine, EngineKind, EngineOptions, Explanation
from rusty_rail.engines.afpacket import AfPacketEngine, local
from rusty_rail.engines.device import TxRefusals
from rusty_rail.engines.afpacket.local import LocalBalancer, merge_counters
from tests.fixtures.golden import LB_ADDRESS, wrapped

WEB = ServiceKey.parse("10.1.0.1:80")
DNS = ServiceKey.parse("10.1.0.1:53/udp")
BACKENDS = [IPv4Address(f"10.2.0.{i}") for i in range(1, 5)]
CLIENTS = [(f"10.0.{i // 200}.{i % 200 + 1}", 1024 + i) for i in range(400)]


class InProcess:
    """What AfPacketEngine does with one worker, without the rings: the control plane's calls go to the
    worker's LocalBalancer, as engine.py passes them."""

    kind = EngineKind.AFPACKET

    def __init__(self, local_balancer: LocalBalancer) -> None:
        self.local = local_balancer

    def apply(self, state: DataplaneState) -> None:
        self.local.apply(state.services)

    def counters(self, *, walk: bool = True) -> Counters:
        return self.local.counters(ready=True, walk=walk)

    def explain(self, key: FlowKey) -> Explanation:
        return self.local.explain(key)


def _state(plane: ControlPlane) -> DataplaneState:
    state = plane.dataplane_state()
    assert state is not None
    return state


def _setup(catch_all: bool = False) -> tuple[ControlPlane, Balancer, list[float]]:
    now = [0.0]
    balancer = Balancer(LB_ADDRESS, b"\x02" * 6, connections=ConnectionTable(1 << 16))
    for b in BACKENDS:
        balancer.set_neighbour(b, b"\x02\x00\x00\x00\x02" + bytes([b.packed[3]]))
    key = ServiceKey.catch_all() if catch_all else WEB
    services = [ServiceSpec(key, tuple(BackendSpec(b) for b in BACKENDS), HealthSpec())]
    if not catch_all:
        services.append(ServiceSpec(DNS, (BackendSpec(BACKENDS[0]),), HealthSpec()))
    engine = cast(Engine, InProcess(LocalBalancer(balancer, clock=lambda: now[0])))  # all the plane calls
    plane = ControlPlane(Config("eth0", tuple(services), table_size=251), engine)
    return plane, balancer, now


@functools.cache
def _frame(client: str, sport: int, dport: int) -> bytes:
    return wrapped(IP(src=client, dst="10.1.0.1") / TCP(sport=sport, dport=dport))


def _send(balancer: Balancer, now: float, dport: int = 80, sport_offset: int = 0) -> dict[tuple[str, int], IPv4Address | DropReason]:
    out: dict[tuple[str, int], IPv4Address | DropReason] = {}
    for client, sport in CLIENTS:
        verdict = balancer.decide(_frame(client, sport + sport_offset, dport), now)
        assert not isinstance(verdict, Pass)
        out[(client, sport)] = verdict.reason if isinstance(verdict, Drop) else IPv4Address(verdict.backend)
    return out


def _service(status: dict, key: ServiceKey) -> dict:  # type: ignore[type-arg]
    return next(s for s in status["services"] if s["service"] == str(key))


def test_a_backend_down_rehashes_only_its_flows_and_returns() -> None:
    plane, balancer, now = _setup()
    before = _send(balancer, 0.0)
    assert set(before.values()) == set(BACKENDS)
    plane.set_health(WEB, BACKENDS[0], False)
    # new flows (a connection entry for a backend that left is not used)
    after = _send(balancer, 1.0)
    for flow, backend in before.items():
        if backend == BACKENDS[0]:
            assert after[flow] != BACKENDS[0]
        else:
            assert after[flow] == backend
    plane.set_health(WEB, BACKENDS[0], True)
    assert _send(balancer, 2.0) == after  # back in the table; flows established meanwhile stay where they went
    assert balancer.services[WEB].service.table.slot_counts()[0] > 0


def test_drain_keeps_established_flows_and_sends_new_ones_elsewhere() -> None:
    plane, balancer, now = _setup()
    before = _send(balancer, 0.0)
    plane.drain(WEB, BACKENDS[1])
    assert _send(balancer, 1.0) == before  # every established flow stays, the drained backend's too
    fresh = _send(balancer, 1.0, sport_offset=30000)
    assert BACKENDS[1] not in fresh.values() and set(fresh.values()) == set(BACKENDS) - {BACKENDS[1]}


def test_a_change_rebuilds_only_its_own_service_and_unmatched_is_dropped() -> None:
    plane, balancer, now = _setup()
    adapter = plane.engine.local  # type: ignore[attr-defined]
    pools = balancer.services
    built, tables = adapter.pools_built, plane.tables_built
    plane.set_weight(WEB, BACKENDS[2], 3)
    assert plane.tables_built == tables + 1 and adapter.pools_built == built + 1
    assert balancer.services[WEB].service.table.slot_counts()[2] > 100
    assert balancer.services[DNS] is pools[DNS], "the other service keeps its pool and its figures"
    assert adapter.apply(_state(plane).services) == 0, "the same services again: nothing rebuilt"
    assert set(_send(balancer, 0.0, dport=443).values()) == {DropReason.NO_SERVICE}


def test_apply_changes_is_the_same_as_applying_the_whole_state() -> None:
    plane, balancer, now = _setup()
    whole = LocalBalancer(Balancer(LB_ADDRESS, b"\x02" * 6))
    parts = LocalBalancer(Balancer(LB_ADDRESS, b"\x02" * 6))
    first = _state(plane).services
    whole.apply(first)
    parts.apply(first)
    plane.drain(WEB, BACKENDS[0])
    second = _state(plane).services
    assert whole.apply(second) == 1
    changed = tuple(s for s in second if s not in first)
    assert parts.apply_changes(changed, ()) == 1
    assert parts.services == whole.services
    assert parts.apply_changes((), (DNS,)) == 0 and set(parts.services) == {WEB}


def test_counters_and_explain() -> None:
    plane, balancer, now = _setup()
    sent = _send(balancer, 0.0)
    status = plane.status()
    backends = _service(status, WEB)["backends"]
    assert sum(b["packets"] for b in backends) == len(CLIENTS)
    assert sum(b["flows"] for b in backends) == len(CLIENTS)
    assert status["counters"]["forwarded"] == len(CLIENTS) and status["counters"]["connections"] == len(CLIENTS)
    assert status["counters"]["drops"]["no_service"] == 0 and "drop_no_service" not in status["counters"]["drops"]
    client, sport = CLIENTS[0]
    flow = FlowKey(IPv4Address(client), IPv4Address("10.1.0.1"), 6, sport, 80)
    explained = plane.explain(flow)
    assert explained["backend"] == str(sent[(client, sport)]) and explained["reason"] == "connection entry"
    now[0] = 10_000.0  # the entry has idled out: the table decides
    assert plane.explain(flow)["reason"].startswith("table slot ")


def test_flows_are_left_out_above_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    plane, balancer, now = _setup()
    _send(balancer, 0.0)
    adapter = plane.engine.local  # type: ignore[attr-defined]
    assert sum(adapter.counters().flows.values()) == len(CLIENTS)
    monkeypatch.setattr(local, "FLOW_COUNT_LIMIT", len(CLIENTS) - 1)
    assert adapter.counters().flows is None
    assert _service(plane.status(), WEB)["backends"][0]["flows"] is None


def test_catch_all_service() -> None:
    plane, balancer, now = _setup(catch_all=True)
    assert len(balancer.services[ServiceKey.catch_all()].backend_set) == 4
    plane.drain(ServiceKey.catch_all(), BACKENDS[0])
    assert balancer.services[ServiceKey.catch_all()].service.table.slot_counts()[0] == 0
    _send(balancer, 0.0)
    assert plane.status()["services"][0]["packets"] == len(CLIENTS)


def test_workers_counters_add_up() -> None:
    a = Counters(forwarded=3, drops={"no_service": 1}, connections=2, backends={(WEB, BACKENDS[0]): (3, 30)},
                 flows={(WEB, BACKENDS[0]): 2}, engine={"rx_packets": 4, "workers": 1})
    b = Counters(forwarded=1, drops={"no_service": 2}, connections=1, backends={(WEB, BACKENDS[0]): (1, 10)},
                 flows={(WEB, BACKENDS[0]): 1}, engine={"rx_packets": 1, "workers": 1})
    total = merge_counters([a, b], ready=True)
    assert (total.forwarded, total.connections, total.ready) == (4, 3, True)
    assert total.drops == {"no_service": 3} and total.backends == {(WEB, BACKENDS[0]): (4, 40)}
    assert total.flows == {(WEB, BACKENDS[0]): 3} and total.engine == {"rx_packets": 5, "workers": 2}
    assert merge_counters([a, Counters(flows=None)], ready=True).flows is None, "a partial total is not a total"


def test_forwards_the_device_did_not_send_are_not_forwarded() -> None:
    plane, balancer, _ = _setup()
    _send(balancer, 0.0)
    balancer.count_drop(DropReason.TX_FAILED)  # neither the TX ring nor the spill socket took one
    c = plane.engine.local.counters()  # type: ignore[attr-defined]
    assert (c.forwarded, c.drops["tx_failed"]) == (len(CLIENTS) - 1, 1)

    class Refusals:  # the device refused 7 after the TX ring took them (engines/device.py)
        def read(self) -> int:
            return 7

    engine = AfPacketEngine(EngineOptions("lb0"))
    engine._refusals = cast(TxRefusals, Refusals())
    total = engine._with_device(c)
    assert (total.forwarded, total.drops["tx_refused"], total.drops["tx_failed"]) == (len(CLIENTS) - 8, 7, 1)


def test_forwards_per_family_never_exceed_the_forwards() -> None:
    """A failed or refused send is not traced to its family (docs/WIRE.md section 9): the IPv6 figure is
    capped at `forwarded`, so IPv4's (the difference) is never negative."""
    balancer = Balancer(LB_ADDRESS, b"\x02" * 6, (), local_address6="2001:db8::11")
    balancer.forwarded = balancer.forwarded6 = 5  # five IPv6 forwards decided
    balancer.count_drop(DropReason.TX_FAILED)
    c = LocalBalancer(balancer).counters()
    assert (c.forwarded, c.forwarded_ipv6) == (4, 4)

    class Refusals:
        def read(self) -> int:
            return 3

    engine = AfPacketEngine(EngineOptions("lb0"))
    engine._refusals = cast(TxRefusals, Refusals())
    total = engine._with_device(c)
    assert (total.forwarded, total.forwarded_ipv6, total.drops["tx_refused"]) == (1, 1, 3)
