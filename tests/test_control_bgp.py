"""BGP without namespaces: the [bgp] keys, the announce rule, the announcer against a fake speaker, the
speaker's ExaBGP configuration, the relay's rules, and what ctl and the metrics show."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest

from rusty_rail.control.bgp import Announcer, Route, ServiceRoute, wanted_routes
from rusty_rail.control.bgp_config import BgpSpec, PeerSpec
from rusty_rail.control.bgp_relay import Relay
from rusty_rail.control.config import ConfigError, RouteSpec, loads_config
from rusty_rail.control.ctl import format_bgp
from rusty_rail.control.metrics import _bgp_metrics
from rusty_rail.control.speaker import render_exabgp

BASE = """device = "eth0"
[[services]]
vip = "10.1.0.1"
port = 80
backends = ["10.2.0.1"]
"""
BGP = """[bgp]
local_as = 65001
[[bgp.peers]]
address = "192.168.137.1"
as = 65000
"""


def test_a_bgp_section_and_route_keys() -> None:
    text = (BASE + 'med = 10\ncommunities = ["65000:80"]\n' + BGP.replace("[bgp]\n", "[bgp]\ndrain_timeout = 5\n")
            + '[[bgp.peers]]\naddress = "192.168.137.2"\nas = 65002\nhold_time = 9\npassword = "s3cret"\n')
    c = loads_config(text)
    assert c.bgp == BgpSpec(65001, (PeerSpec(IPv4Address("192.168.137.1"), 65000),
                                    PeerSpec(IPv4Address("192.168.137.2"), 65002, 9, "s3cret")), None, 5.0)
    assert c.services[0].route == RouteSpec(True, ((65000, 80),), 10)
    assert loads_config(BASE).bgp is None and loads_config(BASE).services[0].route == RouteSpec()


@pytest.mark.parametrize(("text", "message"), [
    (BASE + "[bgp]\n", "bgp.local_as: missing"),
    (BASE + "[bgp]\nlocal_as = 65001\n", "bgp.peers: none configured"),
    (BASE + BGP.replace("65001", "0"), "bgp.local_as: 0 is not >= 1"),
    (BASE + BGP.replace("65001", '"x"'), 'bgp.local_as: "x" is not a whole number'),
    (BASE + BGP + "hold_time = 2\n", "bgp.peers[0].hold_time: 2 is not 0 or >= 3 (RFC 4271)"),
    (BASE + BGP + "holdtime = 3\n", "bgp.peers[0].holdtime: unknown key"),
    (BASE + BGP.replace('"192.168.137.1"', '"router"'), 'bgp.peers[0].address: "router" is not an IPv4 address'),
    (BASE + BGP + 'password = "a;b"\n', "bgp.peers[0].password: must be 1..80 bytes"),
    (BASE + BGP + '[[bgp.peers]]\naddress = "192.168.137.1"\nas = 1\n', "bgp.peers[1].address: 192.168.137.1 is already peers[0]"),
    (BASE + BGP.replace("[bgp]\n", '[bgp]\nrouter_id = "0.0.0.0"\n'), 'bgp.router_id: "0.0.0.0" is not a unicast address'),
    (BASE + BGP.replace("[bgp]\n", "[bgp]\ndrain_timeout = -1\n"), "bgp.drain_timeout: -1 is not > 0"),
    (BASE + 'communities = ["65000:70000"]\n', 'services[0].communities[0]: "65000:70000" is not a community'),
    (BASE + "med = -1\n", "services[0].med: -1 is not >= 0"),
    (BASE + 'announce = "yes"\n', 'services[0].announce: "yes" is not true or false'),
    (BASE + '[[services]]\nvip = "10.1.0.1"\nport = 443\nbackends = ["10.2.0.1"]\nmed = 5\n',
     "services[1].med: differs from services[0].med"),
    ('device = "eth0"\n[[services]]\nvip = "*"\nbackends = ["10.2.0.1"]\nannounce = true\n',
     'services[0].announce: true: the catch-all service (vip "*") has no VIP to announce'),
])
def test_bad_bgp_keys_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        loads_config(text)
    assert str(error.value).startswith(message), str(error.value)


WEB = ServiceRoute("10.1.0.1:80/tcp", IPv4Address("10.1.0.1"), RouteSpec(med=10, communities=((65000, 80),)), 2)
TLS = ServiceRoute("10.1.0.1:443/tcp", IPv4Address("10.1.0.1"), RouteSpec(med=10, communities=((65000, 80),)), 0)
DNS = ServiceRoute("10.1.0.2:53/udp", IPv4Address("10.1.0.2"), RouteSpec(), 0)
QUIET = ServiceRoute("10.1.0.3:80/tcp", IPv4Address("10.1.0.3"), RouteSpec(announce=False), 1)
ANY = ServiceRoute("*", None, RouteSpec(announce=False), 1)


def test_the_announce_rule() -> None:
    services = [WEB, TLS, DNS, QUIET, ANY]
    wanted = wanted_routes(services, ready=True, drained=False, stopping=False)
    assert set(wanted) == {"10.1.0.1/32", "10.1.0.2/32"}  # announce = false and the catch-all: never
    route, reason = wanted["10.1.0.1/32"]
    assert route == Route("10.1.0.1/32", 10, ((65000, 80),))  # one of the VIP's services serves: announced
    assert reason == "10.1.0.1:80/tcp: 2 healthy backends"
    assert wanted["10.1.0.2/32"] == (None, "10.1.0.2:53/udp: no healthy backend")
    for kwargs, why in (({"ready": False, "drained": False, "stopping": False}, "engine not forwarding yet"),
                        ({"ready": True, "drained": True, "stopping": False}, "balancer drained (ctl drain-balancer)"),
                        ({"ready": True, "drained": True, "stopping": True}, "stopping: withdrawn before the data plane lets go")):
        assert wanted_routes(services, **kwargs)["10.1.0.1/32"] == (None, why)


V6 = '[[services]]\nvip = "2001:db8:1::1"\nport = 443\nbackends = ["2001:db8:2::1", "10.2.0.1"]\n'
SIX = ServiceRoute("[2001:db8:1::1]:443/tcp", ip_address("2001:db8:1::1"), RouteSpec(med=7), 1)


def test_ipv6_vips_are_announced_by_the_same_rule_with_an_ipv6_next_hop() -> None:
    """An IPv6 VIP is announced (a /128, after the IPv4 ones) with the device's IPv6 address as next hop,
    over the IPv4 session; announce = false keeps it out, as for IPv4. Without an IPv6 next hop it is
    withdrawn, and says why."""
    config = loads_config(BASE + V6 + BGP)
    assert config.bgp is not None and config.services[1].route.announce
    assert not loads_config(BASE + V6 + "announce = false\n" + BGP).services[1].route.announce
    hop = IPv6Address("2001:db8:137::11")
    wanted = wanted_routes([SIX, WEB], ready=True, drained=False, stopping=False, next_hop6=hop)
    assert list(wanted) == ["10.1.0.1/32", "2001:db8:1::1/128"]
    assert wanted["2001:db8:1::1/128"] == (Route("2001:db8:1::1/128", 7, (), "2001:db8:137::11"),
                                           "[2001:db8:1::1]:443/tcp: 1 healthy backend")
    assert wanted["10.1.0.1/32"][0] == Route("10.1.0.1/32", 10, ((65000, 80),), "self")
    down = ServiceRoute(SIX.name, SIX.vip, SIX.route, 0)
    assert wanted_routes([down], ready=True, drained=False, stopping=False, next_hop6=hop)["2001:db8:1::1/128"] == (
        None, "[2001:db8:1::1]:443/tcp: no healthy backend")
    assert wanted_routes([SIX], ready=True, drained=True, stopping=False, next_hop6=hop)["2001:db8:1::1/128"][0] is None
    assert wanted_routes([SIX], ready=True, drained=False, stopping=False)["2001:db8:1::1/128"] == (
        None, "no IPv6 next hop: the device has no global IPv6 address")


def test_route_commands_in_exabgps_grammar() -> None:
    r = Route("10.1.0.1/32", 10, ((65000, 80), (65000, 443)))
    assert r.announce() == "announce route 10.1.0.1/32 next-hop self med 10 community [65000:80 65000:443]"
    assert Route("10.1.0.2/32").announce() == "announce route 10.1.0.2/32 next-hop self"
    assert r.withdraw() == "withdraw route 10.1.0.1/32 next-hop self"
    six = Route("2001:db8:1::1/128", next_hop="2001:db8:137::11")
    assert six.announce() == "announce route 2001:db8:1::1/128 next-hop 2001:db8:137::11"
    assert six.withdraw() == "withdraw route 2001:db8:1::1/128 next-hop 2001:db8:137::11"
    assert Route.held(six.announce()) == six and Route.held(r.announce()) == Route("10.1.0.1/32")


SPEC = BgpSpec(65001, (PeerSpec(IPv4Address("192.168.137.1"), 65000),
                       PeerSpec(IPv4Address("192.168.137.2"), 65002, 9, "s3cret")))


def test_exabgp_configuration() -> None:
    text = render_exabgp(SPEC, IPv4Address("1.1.1.1"), IPv4Address("192.168.137.11"), ["/py", "-m", "relay"])
    assert "process rusty-rail {\n  run /py -m relay;\n  encoder json;\n}" in text
    assert text.count("neighbor ") == 2 and "  local-address 192.168.137.11;" in text and "  router-id 1.1.1.1;" in text
    assert "  peer-as 65002;\n  hold-time 9;\n  md5-password \"s3cret\";" in text
    assert text.count("md5-password") == 1 and text.count("neighbor-changes") == 2
    assert text.count("  family { ipv4 unicast; ipv6 unicast; }") == 2  # IPv6 VIPs over the IPv4 sessions


class FakeSpeaker:
    router_id = IPv4Address("192.168.137.11")
    exabgp_pid = 42
    restarts = 0

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.connected = threading.Event()
        self.connected.set()
        self.held: float | None = None

    def send(self, command: str) -> bool:
        if not self.connected.is_set():
            return False
        self.sent.append(command)
        return True

    def hold(self, seconds: float) -> bool:
        self.held = seconds
        return True

    def start(self) -> None: ...

    def close(self, shutdown: bool = True) -> None: ...


def announcer(services: list[ServiceRoute], ready: list[bool]) -> tuple[Announcer, FakeSpeaker]:
    speaker = FakeSpeaker()
    a = Announcer(SPEC, routes=lambda: services, ready=lambda: ready[0], make_speaker=lambda _: speaker,  # type: ignore[arg-type,return-value]
                  clock=lambda: 1000.0)
    return a, speaker


def test_announcer_follows_the_rule_and_logs_why(caplog: pytest.LogCaptureFixture) -> None:
    services, ready = [WEB], [False]
    a, speaker = announcer(services, ready)
    caplog.set_level(logging.INFO, "rusty_rail.bgp")
    a.reconcile()
    assert speaker.sent == []  # not forwarding yet: nothing changes
    ready[0] = True
    a.reconcile()
    a.reconcile()  # nothing new: nothing sent again
    assert speaker.sent == [Route("10.1.0.1/32", 10, ((65000, 80),)).announce()]
    services[0] = ServiceRoute(WEB.name, WEB.vip, WEB.route, 0)  # the last backend failed its checks
    a.reconcile()
    a.set_drained(True)
    services[0] = WEB
    a.reconcile()  # healthy again, but drained: stays withdrawn
    a.set_drained(False)
    services.clear()  # the service went (a reload)
    a.reconcile()
    assert speaker.sent[1:] == ["withdraw route 10.1.0.1/32 next-hop self", speaker.sent[0],
                                "withdraw route 10.1.0.1/32 next-hop self"]
    lines = [(r.event, r.reason) for r in caplog.records if getattr(r, "event", "").startswith("bgp_")]  # type: ignore[attr-defined]
    assert lines == [("bgp_announce", "10.1.0.1:80/tcp: 2 healthy backends"),
                     ("bgp_withdraw", "10.1.0.1:80/tcp: no healthy backend"),
                     ("bgp_announce", "10.1.0.1:80/tcp: 2 healthy backends"),
                     ("bgp_withdraw", "no service announces it any more")]


def test_announcer_withdraws_an_ipv6_route_with_the_next_hop_it_was_announced_with() -> None:
    services = [SIX]
    speaker = FakeSpeaker()
    a = Announcer(SPEC, routes=lambda: services, ready=lambda: True, make_speaker=lambda _: speaker,  # type: ignore[arg-type,return-value]
                  next_hop6=IPv6Address("2001:db8:137::11"))
    a.reconcile()
    services.clear()
    a.reconcile()
    assert speaker.sent == ["announce route 2001:db8:1::1/128 next-hop 2001:db8:137::11 med 7",
                            "withdraw route 2001:db8:1::1/128 next-hop 2001:db8:137::11"]
    assert a.status()["next_hop6"] == "2001:db8:137::11"


def test_announcing_an_ipv6_vip_needs_an_ipv6_address_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before anything starts, naming the device and the VIP; with announce = false it starts."""
    from rusty_rail.control import runtime
    from rusty_rail.engines import neighbours

    info = neighbours.DeviceInfo(2, b"\x02" * 6, IPv4Address("192.168.137.11"), None, 1500)
    monkeypatch.setattr(neighbours, "device_info", lambda device: info)
    base = BASE.replace("[[services]]", 'control_socket = "/run/rr-test.sock"\n[[services]]', 1)
    with pytest.raises(ValueError, match="bgp: device 'eth0' has no global IPv6 address, the next hop of IPv6 VIP "
                                         "2001:db8:1::1's route"):
        runtime._announcer(loads_config(base + V6 + BGP), engine=None)  # type: ignore[arg-type]
    quiet = loads_config(base + V6 + "announce = false\n" + BGP)
    assert runtime._announcer(quiet, engine=None).next_hop6 is None  # type: ignore[arg-type]


def test_announcer_takes_over_what_a_speaker_holds() -> None:
    a, speaker = announcer([WEB], [False])
    held = Route("10.1.0.1/32", 10, ((65000, 80),)).announce()
    a.on_connect({"routes": [held, "announce route 10.9.9.9/32 next-hop self"],
                  "peers": {"192.168.137.1": {"type": "state", "neighbor": {"address": {"peer": "192.168.137.1"},
                                                                              "state": "up"}}}})
    assert speaker.sent == []  # engine not ready yet: the held routes stay (a handover's)
    a.ready = lambda: True
    a.reconcile()
    assert speaker.sent == ["withdraw route 10.9.9.9/32 next-hop self"]  # only what is no longer wanted
    status = a.status()
    assert status["peers"][0] == {"address": "192.168.137.1", "as": 65000, "state": "up", "uptime_s": 0.0,
                                  "since": 1000.0, "reason": "", "prefixes": ["10.1.0.1/32"]}
    assert status["peers"][1]["state"] == "connecting" and status["peers"][1]["prefixes"] == []
    assert "192.168.137.1" in "\n".join(format_bgp(status))
    metrics = {m.name: [(s.labels, s.value) for s in m.samples] for m in _bgp_metrics(status)}
    assert metrics["rusty_rail_bgp_session_up"] == [({"peer": "192.168.137.1"}, 1.0), ({"peer": "192.168.137.2"}, 0.0)]
    assert metrics["rusty_rail_bgp_announced"] == [({"peer": "192.168.137.1"}, 1.0), ({"peer": "192.168.137.2"}, 0.0)]


def test_a_frozen_announcer_changes_nothing() -> None:
    a, speaker = announcer([WEB], [True])
    a.reconcile()
    assert a.hold_for_handover() and speaker.held is not None
    a.ready = lambda: False  # the engine stops calling itself ready as it hands over
    a.set_drained(True)
    assert speaker.sent == [Route("10.1.0.1/32", 10, ((65000, 80),)).announce()]


def test_announcer_without_a_speaker_resends_on_connect() -> None:
    a, speaker = announcer([WEB], [True])
    speaker.connected.clear()
    a.reconcile()
    assert speaker.sent == [] and a.announced == {}
    speaker.connected.set()
    a.on_connect({"routes": [], "peers": {}})
    assert speaker.sent == [Route("10.1.0.1/32", 10, ((65000, 80),)).announce()]


def test_relay_remembers_routes_and_shuts_down_without_its_daemon() -> None:
    out = io.StringIO()
    relay = Relay("unused", out)
    a, b = socket.socketpair()
    relay.daemon = a
    relay.from_daemon(b'{"exabgp": "announce route 10.1.0.1/32 next-hop self"}\n{"exabgp": "announce route 10.1.0.2/32')
    relay.from_daemon(b' next-hop self"}\n{"exabgp": "withdraw route 10.1.0.1/32 next-hop self"}\nnot json\n')
    assert relay.routes == {"10.1.0.2/32": "announce route 10.1.0.2/32 next-hop self"}
    relay.from_exabgp(json.dumps({"type": "state", "neighbor": {"address": {"peer": "192.168.137.1"}, "state": "up"}}))
    assert json.loads(b.recv(4096))["exabgp"].startswith("{")
    relay.lost_daemon()  # the daemon died (no hold): ExaBGP is told to shut down
    assert out.getvalue().splitlines()[-1] == "shutdown" and relay.stopping
    b.close()


def test_relay_holds_for_the_next_daemon() -> None:
    out = io.StringIO()
    relay = Relay("unused", out)
    a, b = socket.socketpair()
    relay.daemon = a
    relay.from_daemon(b'{"hold": 30}\n')
    relay.lost_daemon()
    assert not relay.stopping and relay.deadline is not None and "shutdown" not in out.getvalue()
    listener_side, daemon_side = socket.socketpair()

    class OneShot:
        def accept(self) -> tuple[socket.socket, Any]:
            return listener_side, None

    relay.accept(OneShot())  # type: ignore[arg-type]
    hello = json.loads(daemon_side.recv(4096))["hello"]
    assert hello["routes"] == [] and relay.deadline is None
    for s in (b, daemon_side, listener_side):
        s.close()


def test_a_bad_bgp_key_stops_the_start_in_one_line(tmp_path: Any) -> None:
    """As an operator runs it: one line naming the key and the value, exit status 1, no traceback."""
    import subprocess
    import sys

    path = tmp_path / "bad.toml"
    path.write_text(BASE + BGP + "hold_time = 1\n")
    done = subprocess.run([sys.executable, "-m", "rusty_rail", "run", "--config", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip() == f"rusty-rail: {path}: bgp.peers[0].hold_time: 1 is not 0 or >= 3 (RFC 4271)"
