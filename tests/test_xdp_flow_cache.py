"""The XDP program's flow cache (bpf/rr_flow_cache.h, docs/WIRE.md section 7) through BPF_PROG_TEST_RUN:
a flow's later packets in a tick take a CPU's copy of its connection entry, every change made from user
space retires the copies at once, the entry in rr_conns is still stamped as ticks pass, and what must
go by the connection table or the service on every packet never takes a copy.

Needs root (loading BPF); skipped otherwise, except in CI where conftest refuses to skip.
"""

from __future__ import annotations

import time
from dataclasses import replace
from ipaddress import ip_address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from rusty_rail.core.conntrack import Timeouts
from rusty_rail.core.options import ServiceOptions
from rusty_rail.engines.xdp import XdpAction, XdpProgram, counters, default_object_path
from tests.fixtures.golden import (
    ALL_BACKENDS,
    BACKENDS,
    BACKENDS6,
    CLIENT,
    LB_ADDRESS,
    LB_ADDRESS6,
    LB_MAC,
    MTU,
    TABLE_SIZE,
    VIP,
    wrapped,
    wrapped6,
)
from tests.oracle import oracle_key
from tests.xdp_support import backend_of, catch_all_state, desired, nonzero

pytestmark = [
    pytest.mark.netns,  # root only: the conftest skips these without it, and CI must run them
    pytest.mark.skipif(not default_object_path().exists(), reason="run `make bpf` first"),
]

REPEAT = 1000
# A run of REPEAT packets takes ~50 us: one tick boundary (4 ms at HZ=250) at most, or a few if the run is
# preempted; each sends one packet of the flow back to rr_conns.
AT_LEAST = REPEAT - 10


def serve(x: XdpProgram, backends, options: ServiceOptions | None = None, timeouts: Timeouts | None = None) -> None:
    state = catch_all_state(backends, TABLE_SIZE)
    if options is not None:
        state = replace(state, services=(replace(state.services[0], options=options),))
    want = desired(state, LB_ADDRESS, LB_MAC, ALL_BACKENDS, LB_ADDRESS6, MTU)
    x.sync(want if timeouts is None else replace(want, timeouts=timeouts))


@pytest.fixture
def xdp():
    with XdpProgram(conn_capacity=4096) as x:
        serve(x, BACKENDS)
        yield x


def tcp_frame(sport: int) -> bytes:
    return wrapped(IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags="A"))


def run(x: XdpProgram, frame: bytes, repeat: int = REPEAT) -> dict[str, int]:
    """The frame `repeat` times in one BPF_PROG_TEST_RUN (each repetition sees the previous output:
    the same flow, forwarded again), counters from zero."""
    counters.reset(x)
    action, _, _ = x.test_run_timed(frame, repeat)
    assert action == XdpAction.TX, nonzero(x)
    return counters.named(x)


def test_later_packets_in_a_tick_come_from_the_cache(xdp) -> None:
    frame = tcp_frame(40000)
    backend = backend_of(xdp, frame)  # the first packet: a new entry
    figures = run(xdp, frame)
    assert figures["conn_hit"] == REPEAT  # every packet a hit, counted once
    assert figures["flow_cache_hit"] >= AT_LEAST, figures
    assert figures["conn_new"] == 0
    assert backend_of(xdp, frame) == backend


def test_ipv6_flows_too(xdp) -> None:
    serve(xdp, BACKENDS6)
    frame = wrapped6(IPv6(src="2001:db8:c::1", dst="2001:db8:1::1") / UDP(sport=40000, dport=53))
    xdp.test_run(frame)
    figures = run(xdp, frame)
    assert figures["conn_hit"] == REPEAT
    assert figures["flow_cache_hit"] >= AT_LEAST, figures


def test_a_change_from_user_space_retires_every_copy_at_once(xdp) -> None:
    """Within one tick a copy would be used: each change below is seen by the very next packet."""
    sport = 40001
    frame, key = tcp_frame(sport), oracle_key(CLIENT, VIP, 6, sport, 80)
    first = backend_of(xdp, frame)
    assert backend_of(xdp, frame) == first  # a copy made (or the tick moved on: rr_conns, the same)
    # An entry rewritten by hand: the next packet goes where it says.
    other = next(b for b in BACKENDS if b != first)
    xdp.write_connection(key, other, time.monotonic_ns())
    assert backend_of(xdp, frame) == other
    # An entry deleted: the next packet is a new flow.
    counters.reset(xdp)
    assert xdp.delete_connection(key)
    assert backend_of(xdp, frame) == first
    assert counters.named(xdp)["conn_insert"] == 1
    # Its backend gone from the service: the next packet goes elsewhere.
    serve(xdp, [b for b in BACKENDS if b != first])
    assert backend_of(xdp, frame) != first


def test_rr_conns_is_still_stamped_as_ticks_pass(xdp) -> None:
    """Each flow goes back to rr_conns once a tick, which stamps its entry: with the cache the stamp moves
    on as it did without it (no copy outlives its tick)."""
    sport = 40002
    frame, key = tcp_frame(sport), oracle_key(CLIENT, VIP, 6, sport, 80)
    backend_of(xdp, frame)
    stamps = {xdp.connection(key).last_seen_ns}
    deadline = time.monotonic() + 5.0  # a tick is 1-10 ms; 5 s only bounds a failure
    while len(stamps) < 3 and time.monotonic() < deadline:
        xdp.test_run_timed(frame, 200)
        stamps.add(xdp.connection(key).last_seen_ns)
    assert len(stamps) >= 3, stamps


@pytest.mark.parametrize("case", ["icmp", "quic", "no_connection_table", "expired", "off"])
def test_what_never_takes_a_copy(xdp, case: str) -> None:
    """ICMP flows (an echo request may be answered), QUIC services (their packets go by server ID), no
    connection table, entries past their idle timeout, and the cache turned off (the benchmark's
    rr_conns path): every packet goes the long way."""
    frame = tcp_frame(40003)
    if case == "icmp":
        frame = wrapped(IP(src=CLIENT, dst=VIP) / ICMP(type=0, id=7))
    elif case == "quic":
        ids = tuple((int(ip_address(b)), i + 1) for i, b in enumerate(sorted(BACKENDS)))
        serve(xdp, BACKENDS, ServiceOptions(quic=True, server_ids=ids))
        frame = wrapped(IP(src=CLIENT, dst=VIP) / UDP(sport=40003, dport=443) / (b"\xc0" + bytes(20)))
    elif case == "no_connection_table":
        serve(xdp, BACKENDS, ServiceOptions(connection_table=False))
    elif case == "expired":
        serve(xdp, BACKENDS, timeouts=Timeouts(0.0, 0.0, 0.0))
    else:
        xdp.use_flow_cache(False)
    xdp.test_run(frame)
    figures = run(xdp, frame, 100)
    assert figures["forwarded"] == 100
    assert figures["flow_cache_hit"] == 0, figures
    if case == "off":
        xdp.use_flow_cache(True)
        xdp.test_run(frame)
        assert run(xdp, frame, 100)["flow_cache_hit"] >= 90
