"""The control plane over a real Balancer: health, drain, weights and removal keep flows where the issue says."""

from __future__ import annotations

import functools
from ipaddress import IPv4Address

from scapy.layers.inet import IP, TCP

from rusty_rail.control.balancer_dataplane import BalancerDataplane
from rusty_rail.control.model import BackendSpec, Config, HealthSpec, ServiceSpec
from rusty_rail.control.plane import ControlPlane
from rusty_rail.core.balancer import Balancer
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import ServiceKey
from rusty_rail.core.verdict import Action, DropReason
from tests.fixtures.golden import LB_ADDRESS, wrapped

WEB = ServiceKey.parse("10.1.0.1:80")
BACKENDS = [IPv4Address(f"10.2.0.{i}") for i in range(1, 5)]
CLIENTS = [(f"10.0.{i // 200}.{i % 200 + 1}", 1024 + i) for i in range(400)]


def _setup(open_mode: bool = False) -> tuple[ControlPlane, Balancer, list[float]]:
    now = [0.0]
    balancer = Balancer(LB_ADDRESS, b"\x02" * 6, services=not open_mode, table_size=251)
    for b in BACKENDS:
        balancer.set_neighbour(b, b"\x02\x00\x00\x00\x02" + bytes([b.packed[3]]))
    if open_mode:
        config = Config("eth0", table_size=251, open_mode_backends=tuple(BACKENDS))
    else:
        config = Config("eth0", table_size=251, services=(ServiceSpec(WEB, tuple(BackendSpec(b) for b in BACKENDS), HealthSpec()),))
    plane = ControlPlane(config, BalancerDataplane(balancer, clock=lambda: now[0]))
    return plane, balancer, now


@functools.cache
def _frame(client: str, sport: int, dport: int) -> bytes:
    return wrapped(IP(src=client, dst="10.1.0.1") / TCP(sport=sport, dport=dport))


def _send(balancer: Balancer, now: float, dport: int = 80, sport_offset: int = 0) -> dict[tuple[str, int], IPv4Address | DropReason]:
    out: dict[tuple[str, int], IPv4Address | DropReason] = {}
    for client, sport in CLIENTS:
        verdict = balancer.decide(_frame(client, sport + sport_offset, dport), now)
        out[(client, sport)] = verdict.reason if verdict.action == Action.DROP else IPv4Address(verdict.backend)
    return out


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
    assert balancer.services[WEB].table.slot_counts()[0] > 0


def test_drain_keeps_established_flows_and_sends_new_ones_elsewhere() -> None:
    plane, balancer, now = _setup()
    before = _send(balancer, 0.0)
    plane.drain(WEB, BACKENDS[1])
    assert _send(balancer, 1.0) == before  # every established flow stays, the drained backend's too
    fresh = _send(balancer, 1.0, sport_offset=30000)
    assert BACKENDS[1] not in fresh.values() and set(fresh.values()) == set(BACKENDS) - {BACKENDS[1]}


def test_weight_change_rebuilds_and_unmatched_is_dropped() -> None:
    plane, balancer, now = _setup()
    rebuilds = balancer.table_rebuilds
    plane.set_weight(WEB, BACKENDS[2], 3)
    assert balancer.table_rebuilds == rebuilds + 1
    assert balancer.services[WEB].table.slot_counts()[2] > 100
    assert set(_send(balancer, 0.0, dport=443).values()) == {DropReason.NO_SERVICE}


def test_counters_and_explain() -> None:
    plane, balancer, now = _setup()
    sent = _send(balancer, 0.0)
    status = plane.status()
    backends = status["services"][0]["backends"]
    assert sum(b["packets"] for b in backends) == len(CLIENTS)
    assert sum(b["flows"] for b in backends) == len(CLIENTS)
    assert status["counters"]["forwarded"] == len(CLIENTS) and status["counters"]["connections"] == len(CLIENTS)
    client, sport = CLIENTS[0]
    flow = FlowKey(IPv4Address(client), IPv4Address("10.1.0.1"), 6, sport, 80)
    explained = plane.explain(flow)
    assert explained["backend"] == str(sent[(client, sport)]) and explained["reason"] == "connection entry"
    now[0] = 10_000.0  # the entry has idled out: the table decides
    assert plane.explain(flow)["reason"].startswith("table slot ")


def test_open_mode_adapter() -> None:
    plane, balancer, now = _setup(open_mode=True)
    assert balancer.pool is not None and len(balancer.pool.backend_set) == 4
    plane.drain(None, BACKENDS[0])
    assert balancer.pool.table.slot_counts()[0] == 0
    _send(balancer, 0.0)
    assert plane.status()["services"][0]["packets"] == len(CLIENTS)
