"""The golden fixtures through the AF_PACKET engine's real rings, on a veth pair (as GLB Director runs one
suite over both its data planes).

The lb side of the pair becomes the golden balancer: LB_MAC, LB_ADDRESS and LB_ADDRESS6, routes to the
backends of both families out of its device and permanent neighbour entries giving each backend its
golden MAC. The peer sends each
fixture's frame and then a sentinel (the first fixture, a known forward); the engine's counters say when
both were handled, and the frames that came back say what was sent:

- FORWARD: exactly the fixture's output bytes (and the sentinel's);
- DROP: nothing but the sentinel, and the drop counted under its reason;
- PASS: nothing but the sentinel, and no drop counted: the engine left the frame to the host;
- REPLY: exactly the fixture's answer (plain IP from a VIP back to the sender) and the sentinel, the
  answer counted among the options' figures.

Twice: with the engine as it ships (a fixture and its sentinel are a call of two frames, which its
block processor hands to decide()), and with the block processor's array path taking every call.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import ip_address

import pytest

from rusty_rail.core.verdict import Action
from rusty_rail.dataplane import Counters, DataplaneState
from rusty_rail.core.balancer import Balancer
from rusty_rail.engines.afpacket.bulk import BulkProcessor
from rusty_rail.engines.afpacket.walker import BlockProcessor
from tests.afpacket_netns import EngineProcess
from tests.engine_netns import VethPair, drain, pending, wait_for
from tests.fixtures.golden import (
    ALL_BACKENDS,
    SMALL,
    SMALL6,
    SMALL_MTU,
    LB_ADDRESS,
    LB_ADDRESS6,
    LB_MAC,
    TABLE_SIZE,
    Golden,
    fixtures,
    golden_services,
)

pytestmark = pytest.mark.netns
LB_PACKED, LB6_PACKED = ip_address(LB_ADDRESS).packed, ip_address(LB_ADDRESS6).packed


def golden_lb(v: VethPair) -> None:
    """Give the lb side the golden balancer's addresses and the backends' next hops."""
    v.ip(v.lb_ns, "link", "set", v.lb_dev, "address", LB_MAC)
    v.ip(v.lb_ns, "addr", "flush", "dev", v.lb_dev)
    v.ip(v.lb_ns, "addr", "add", f"{LB_ADDRESS}/24", "dev", v.lb_dev)
    v.ip(v.lb_ns, "-6", "addr", "add", f"{LB_ADDRESS6}/64", "dev", v.lb_dev, "nodad")
    v.ip(v.lb_ns, "route", "add", "10.2.0.0/24", "dev", v.lb_dev)
    v.ip(v.lb_ns, "-6", "route", "add", "2001:db8:2::/64", "dev", v.lb_dev)
    for backend in {**SMALL, **SMALL6}:  # the path toward them is narrower than the device (WIRE.md 8b)
        v.ip(v.lb_ns, "route", "add", backend, "dev", v.lb_dev, "mtu", str(SMALL_MTU))
    for backend, mac in ALL_BACKENDS.items():
        v.ip(v.lb_ns, "neigh", "replace", backend, "lladdr", mac, "dev", v.lb_dev, "nud", "permanent")


def gre_from_lb(frame: bytes) -> bool:
    """Any GRE frame, over IPv4 or IPv6, that reached the peer (the peer's socket ignores its own sends).
    The lb host's stack sends no GRE, so this is everything the engine sent, right or wrong; its ARP,
    ICMP or neighbour discovery answers to the PASS fixtures are not GRE."""
    if frame[12:14] == b"\x86\xdd":
        return len(frame) >= 54 and frame[20] == 47
    return len(frame) >= 34 and frame[12:14] == b"\x08\x00" and frame[23] == 47


def answer_from_lb(frame: bytes) -> bool:
    """An answer of the engine's own (WIRE.md section 11): ICMP or ICMPv6 from an address that is not the
    lb host's (a VIP). The host's own ICMP answers to PASS fixtures come from its addresses."""
    if frame[12:14] == b"\x86\xdd":
        return len(frame) >= 54 and frame[20] == 58 and frame[22:38] != LB6_PACKED and frame[22:24] != b"\xfe\x80"
    return len(frame) >= 34 and frame[12:14] == b"\x08\x00" and frame[23] == 1 and frame[26:30] != LB_PACKED


def sent_by_engine(frame: bytes) -> bool:
    return gre_from_lb(frame) or answer_from_lb(frame)


def answers(c: Counters) -> int:
    return c.options.get("icmp_echo_replies", 0) + c.options.get("icmp_too_big", 0)


def handled(expect_forwarded: int, expect_drops: dict[str, int], ask: Callable[[], Counters],
            expect_answers: int = 0) -> Counters:
    """Wait until the engine counted what the fixture and its sentinel must add up to."""
    def done() -> Counters | None:
        c = ask()
        return c if (c.forwarded >= expect_forwarded and answers(c) >= expect_answers
                     and all(c.drops[k] >= n for k, n in expect_drops.items())) else None
    counters = wait_for(done, timeout=5, what=f"{expect_forwarded} forwards and drops {expect_drops}")
    assert counters is not None
    return counters


def arrays_always(balancer: Balancer) -> BlockProcessor:
    return BulkProcessor(balancer, bulk_from=1)


@pytest.mark.parametrize("arrays", [False, True], ids=["as shipped", "array path"])
def test_every_golden_fixture_through_the_rings(veth: VethPair, arrays: bool) -> None:
    v = veth
    golden_lb(v)
    cap = v.peer_packet_socket()
    sentinel = fixtures()[0]
    assert sentinel.action == Action.FORWARD and sentinel.output is not None
    sentinel_output = sentinel.output
    state = DataplaneState(golden_services(), TABLE_SIZE)
    failures: list[str] = []
    with EngineProcess(v, state, **({"processor": arrays_always} if arrays else {})) as engine:
        before = engine.counters()
        assert before.ready
        for fx in fixtures():
            cap.send(fx.frame)
            cap.send(sentinel.frame)
            forwards = before.forwarded + (2 if fx.action == Action.FORWARD else 1)
            drops = dict(before.drops)
            if fx.action == Action.DROP:
                assert fx.reason is not None
                drops[fx.reason.name.lower()] += 1
            replied = answers(before) + (fx.action == Action.REPLY)
            after = handled(forwards, drops, engine.counters, replied)
            got = drain(cap, sent_by_engine, forwards - before.forwarded + (fx.action == Action.REPLY))
            got += pending(cap, sent_by_engine)
            failures += check(fx, got, sentinel_output, before, after, forwards, drops)
            before = after
        report = engine.stop()
    assert not failures, "\n".join(failures)
    assert report.counters.engine["tx_failed"] == 0
    assert report.counters.engine["rx_kernel_drops"] == 0
    if arrays:
        assert report.counters.engine["bulk_frames"] > len(fixtures()), "the sentinels and plain forwards took the arrays"


def check(fx: Golden, got: list[bytes], sentinel: bytes, before: Counters, after: Counters, forwards: int,
          drops: dict[str, int]) -> list[str]:
    """What is wrong with one fixture's run, in words (empty: nothing)."""
    wrong = []
    want = [sentinel]
    if fx.action in (Action.FORWARD, Action.REPLY):
        assert fx.output is not None
        want = sorted([fx.output, sentinel])
    if sorted(got) != want:
        wrong.append(f"{fx.description}: sent {[g.hex() for g in got]}, want {[w.hex() for w in want]}")
    if after.forwarded != forwards:
        wrong.append(f"{fx.description}: {after.forwarded - before.forwarded} forwards counted, want {forwards - before.forwarded}")
    if dict(after.drops) != drops:
        changed = {k: n - before.drops[k] for k, n in after.drops.items() if n != before.drops[k]}
        wrong.append(f"{fx.description}: drops changed by {changed}, want {fx.reason}")
    if fx.action == Action.FORWARD and fx.backend is not None:
        grew = {str(key[1]) for key, (packets, _) in after.backends.items() if packets > before.backends.get(key, (0, 0))[0]}
        if fx.backend not in grew:
            wrong.append(f"{fx.description}: backend {fx.backend} not counted (counted: {sorted(grew)})")
    return wrong
