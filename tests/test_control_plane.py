from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv6Address

import pytest

from rusty_rail.control.config import BackendSpec, Config, HealthType, ServiceSpec, from_environment
from rusty_rail.control.plane import ControlError, ControlPlane, parse_backend, parse_service
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import ServiceKey, ServiceProtocol
from tests.control_fakes import B1, B2, B3, DNS, WEB, FakeEngine, two_services


def _plane(config: Config | None = None) -> tuple[ControlPlane, FakeEngine, list]:
    dp = FakeEngine()
    targets: list = []
    plane = ControlPlane(config or two_services(), dp, on_targets=targets.append)
    return plane, dp, targets


def test_applies_the_configuration_once_at_start() -> None:
    plane, dp, _ = _plane()
    assert dp.last == {WEB: {B1: 1, B2: 2}, DNS: {B1: 1}}
    assert len(dp.applied) == 1 and plane.applies == 1


def test_the_environment_form_is_one_catch_all_service() -> None:
    plane, dp, _ = _plane(from_environment({"RR_DEVICE": "eth0", "RR_TARGET_IPS": f"{B1};{B2}"}))
    every = ServiceKey.catch_all()
    assert dp.last == {every: {B1: 1, B2: 1}}
    plane.drain(parse_service("*"), B1)
    assert dp.last == {every: {B1: 0, B2: 1}}
    plane.undrain(parse_service("open"), B1)  # the name earlier releases used
    assert dp.last == {every: {B1: 1, B2: 1}}
    status = plane.status()["services"][0]
    assert (status["service"], status["vip"], status["protocol"], status["port"]) == ("*", None, "any", 0)


def test_runtime_changes() -> None:
    plane, dp, targets = _plane()
    plane.add(WEB, B3, 3)
    assert dp.last[WEB] == {B1: 1, B2: 2, B3: 3}
    assert {(t.service, t.backend) for t in targets[-1]} == {(WEB, B1), (WEB, B2), (WEB, B3)}  # DNS has no check
    plane.drain(WEB, B1)
    assert dp.last[WEB] == {B1: 0, B2: 2, B3: 3}  # listed at weight 0: its flows stay
    plane.set_weight(WEB, B2, 5)
    plane.undrain(WEB, B1)
    assert dp.last[WEB] == {B1: 1, B2: 5, B3: 3}
    plane.remove(WEB, B3)
    assert dp.last[WEB] == {B1: 1, B2: 5}
    assert dp.last[DNS] == {B1: 1}


def test_no_apply_when_nothing_changes() -> None:
    plane, dp, _ = _plane()
    plane.drain(WEB, B1)
    plane.drain(WEB, B1)
    plane.set_weight(WEB, B2, 2)
    assert len(dp.applied) == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p.add(WEB, B1), "10.2.0.1 is already a backend of 10.1.0.1:80/tcp"),
        (lambda p: p.remove(WEB, B3), "10.2.0.3 is not a backend of 10.1.0.1:80/tcp"),
        (lambda p: p.drain(parse_service("10.9.9.9:80"), B1), "no service 10.9.9.9:80/tcp (services: 10.1.0.1:80/tcp, 10.1.0.1:53/udp)"),
        (lambda p: p.set_weight(WEB, B1, -1), "weight -1 is not a whole number in 0..1000"),
        (lambda p: p.drain(ServiceKey.catch_all(), B1), "no service * (services: 10.1.0.1:80/tcp, 10.1.0.1:53/udp)"),
    ],
)
def test_errors_are_clear(call, message: str) -> None:  # type: ignore[no-untyped-def]
    plane, dp, _ = _plane()
    with pytest.raises(ControlError) as info:
        call(plane)
    assert str(info.value) == message
    assert len(dp.applied) == 1


def test_parsers() -> None:
    assert parse_service("10.1.0.1:80") == WEB and parse_service("10.1.0.1:53/udp") == DNS
    assert parse_service("*") == parse_service("open") == ServiceKey.catch_all()
    assert parse_backend(" 10.2.0.1 ") == B1
    with pytest.raises(ControlError, match="is not a service"):
        parse_service("10.1.0.1:http")
    with pytest.raises(ControlError, match="is not a service"):
        parse_service("10.1.0.1:80/sctp")
    with pytest.raises(ControlError, match="not an IPv4 or IPv6 address"):
        parse_backend("backend-1")
    assert parse_backend("2001:db8:2::1") == IPv6Address("2001:db8:2::1")
    assert parse_service("[2001:db8:1::1]:443") == ServiceKey(IPv6Address("2001:db8:1::1"), ServiceProtocol.TCP, 443)
    with pytest.raises(ControlError, match=r"\[IPv6 VIP\]:PORT"):
        parse_service("[2001:db8:1::1:443")


def test_health_takes_a_backend_out_and_back() -> None:
    plane, dp, _ = _plane()
    plane.set_health(WEB, B2, False, "3 checks failed")
    assert dp.last[WEB] == {B1: 1}
    backend = plane.status()["services"][0]["backends"][1]
    assert (backend["health"], backend["state"], backend["served_weight"]) == ("down", "down", None)
    plane.set_health(WEB, B2, True)
    assert dp.last[WEB] == {B1: 1, B2: 2}
    plane.set_health(WEB, B3, False)  # not a backend (removed meanwhile): ignored
    assert plane.health_transitions == 2 and len(dp.applied) == 3


def test_a_drained_backend_that_goes_down_leaves_and_stays_drained() -> None:
    plane, dp, _ = _plane()
    plane.drain(WEB, B1)
    plane.set_health(WEB, B1, False)
    assert dp.last[WEB] == {B2: 2}
    plane.set_health(WEB, B1, True)
    assert dp.last[WEB] == {B1: 0, B2: 2}


def test_reload_keeps_drains_and_health_drops_other_runtime_changes() -> None:
    plane, dp, targets = _plane()
    plane.drain(WEB, B1)
    plane.set_health(WEB, B2, False)
    plane.add(WEB, B3)
    new = dataclasses.replace(two_services(), metrics="127.0.0.1:9200")
    notes = plane.reload(new)
    assert notes == ["metrics changed from None to '127.0.0.1:9200': takes effect after a restart"]
    assert dp.last[WEB] == {B1: 0}  # B1 still drained, B2 still down, B3 (runtime only) gone
    assert plane.config.metrics is None and plane.reloads == 1
    assert {t.backend for t in targets[-1]} == {B1, B2}


def test_reload_with_a_changed_check_resets_health() -> None:
    plane, dp, _ = _plane()
    plane.set_health(WEB, B2, False)
    web = two_services().services[0]
    changed = dataclasses.replace(web, health=dataclasses.replace(web.health, port=9090))
    plane.reload(dataclasses.replace(two_services(), services=(changed,)))
    assert dp.last == {WEB: {B1: 1, B2: 2}}  # DNS removed, B2 assumed up under its new check


def test_a_refused_apply_leaves_the_running_state() -> None:
    plane, dp, _ = _plane()
    dp.fail_next = True
    with pytest.raises(ControlError, match="the data plane refused the change: map update failed"):
        plane.reload(Config("eth0", (ServiceSpec(WEB, (BackendSpec(B3),)),)))
    assert dp.last == {WEB: {B1: 1, B2: 2}, DNS: {B1: 1}}
    assert plane.reload_failures == 1 and "map update failed" in str(plane.last_reload_error)
    assert plane.status()["services"][0]["backends"][0]["address"] == str(B1)


def test_status_combines_state_and_counters() -> None:
    plane, _, _ = _plane()
    plane.drain(WEB, B2)
    status = plane.status()
    assert status["device"] == "eth0" and status["engine"] == "afpacket" and status["ready"] is True
    web, dns = status["services"]
    assert web["service"] == "10.1.0.1:80/tcp" and web["health"]["type"] == "tcp" and web["health"]["port"] == 8080
    assert (web["packets"], web["bytes"]) == (10, 1000)
    b1, b2 = web["backends"]
    assert b1 == {"address": "10.2.0.1", "weight": 1, "drained": False, "health": "up", "health_reason": "",
                  "served_weight": 1, "state": "active", "packets": 7, "bytes": 700, "flows": 4}
    assert (b2["state"], b2["drained"], b2["served_weight"]) == ("drained", True, 0)
    assert dns["backends"][0]["health"] == "unchecked" and dns["packets"] == 0
    assert dns["backends"][0]["flows"] == 2, "a backend's flows are counted per service"
    assert status["counters"]["drops"] == {"no_service": 2, "no_backend": 0}
    # Tables built: WEB and DNS at start, WEB again for the drain; DNS's table was reused.
    assert status["counters"]["table_rebuilds"] == 3 and status["control"]["applies"] == 2


def test_explain_names_the_service() -> None:
    plane, dp, _ = _plane()
    flow = FlowKey(IPv4Address("192.0.2.7"), WEB.vip, 6, 40000, 80)
    assert plane.explain(flow) == {"flow": "192.0.2.7:40000 -> 10.1.0.1:80 tcp", "service": "10.1.0.1:80/tcp",
                                   "backend": "10.2.0.1", "reason": "table slot 42"}
    assert dp.explained == [flow]
    other = FlowKey(IPv4Address("192.0.2.7"), WEB.vip, 6, 40000, 443)
    assert plane.explain(other)["service"] is None
    six = FlowKey(IPv6Address("2001:db8:c::7"), IPv6Address("2001:db8:1::1"), 6, 40000, 443)
    assert plane.explain(six)["flow"] == "[2001:db8:c::7]:40000 -> [2001:db8:1::1]:443 tcp"


def test_status_per_family_and_ipv6_backends() -> None:
    plane, dp, _ = _plane()
    assert plane.status()["counters"]["by_family"] == {"ipv4": {"forwarded": 6, "connections": 3},
                                                       "ipv6": {"forwarded": 4, "connections": 2}}
    plane.add(WEB, IPv6Address("2001:db8:2::9"), 2)
    assert dp.last[WEB] == {B1: 1, B2: 2, IPv6Address("2001:db8:2::9"): 2}
    assert [b["address"] for b in plane.status()["services"][0]["backends"]][-1] == "2001:db8:2::9"


def test_health_none_config_gives_no_targets() -> None:
    plane, _, _ = _plane(two_services(HealthType.NONE))
    assert plane.targets() == []
