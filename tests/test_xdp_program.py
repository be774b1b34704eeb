"""The XDP program through BPF_PROG_TEST_RUN: golden fixtures, hand-built frames, and a differential
run against the Python core (rusty_rail.core.balancer), serving the environment form (one catch-all
service; tests/test_xdp_services.py has services with VIPs). Frames are built with scapy.

Needs root (loading BPF); skipped otherwise, except in CI where conftest refuses to skip.
"""

from __future__ import annotations

import ctypes
import functools
import os
import random
import time
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import GRE, Ether
from scapy.packet import Raw

from rusty_rail.bpf import libbpf
from rusty_rail.core.balancer import Balancer
from rusty_rail.core.ethernet import mac_to_bytes
from rusty_rail.core.verdict import Action, DropReason
from rusty_rail.dataplane import DataplaneState
from rusty_rail.engines.xdp import XdpAction, XdpProgram, counters, default_object_path
from rusty_rail.engines.xdp import maps as m
from rusty_rail.engines.xdp.planner import Desired
from tests.fixtures.golden import (
    ALL_BACKENDS,
    BACKENDS,
    LB_ADDRESS6,
    MTU,
    CLIENT,
    LB_ADDRESS,
    LB_MAC,
    TABLE_SIZE,
    VIP,
    expected_backend,
    fixtures,
    forwarded,
    golden_balancer,
    golden_services,
    wrapped,
)
from tests.oracle import oracle_hash, oracle_key, oracle_maglev
from tests.services import catch_all
from tests.xdp_support import VERDICT, backend_index, backend_of, catch_all_state, desired, mirror, nonzero

pytestmark = [
    pytest.mark.netns,  # root only: the conftest skips these without it, and CI must run them
    pytest.mark.skipif(not default_object_path().exists(), reason="run `make bpf` first"),
]

EXTRA = {"10.2.0.4": "02:00:00:00:02:04", "10.2.0.5": "02:00:00:00:02:05", "10.2.0.6": "02:00:00:00:02:06"}
ALL_MACS = {**BACKENDS, **EXTRA}


@pytest.fixture(scope="module")
def golden_reference() -> Balancer:
    """Read only: its configuration, table and neighbours are copied into each fresh program."""
    return golden_balancer()


@pytest.fixture
def xdp():
    """A fresh program serving the catch-all over BACKENDS (M = 65537) with the golden balancer's
    addresses, MTU and next hops."""
    with XdpProgram(conn_capacity=4096) as x:
        x.sync(desired(catch_all_state(BACKENDS, TABLE_SIZE), LB_ADDRESS, LB_MAC, ALL_BACKENDS, LB_ADDRESS6, MTU))
        yield x


@pytest.fixture(scope="module")
def golden_program():
    """One program serving golden_services() (the catch-all and three services with VIPs) for every
    golden fixture: filling four tables of 65537 slots per fixture would cost a minute."""
    with XdpProgram(conn_capacity=4096) as x:
        x.sync(Desired.mirror(golden_balancer(), TABLE_SIZE))  # route MTUs and options included
        yield x


@pytest.fixture
def golden_xdp(golden_program):
    """golden_program as a fresh one: no connection entries, counters at zero."""
    golden_program.clear_connections()
    counters.reset(golden_program)
    return golden_program


def sync(x: XdpProgram, backends, weights=None, macs=None) -> None:
    """Serve a catch-all over `backends` (next hops from ALL_MACS unless `macs` is given)."""
    macs = {b: ALL_MACS[b] for b in backends} if macs is None else macs
    x.sync(desired(catch_all_state(backends, TABLE_SIZE, weights), LB_ADDRESS, LB_MAC, macs))


def tcp(sport: int, dport: int = 80, src: str = CLIENT, dst: str = VIP, **kw):
    return IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="A", **kw)


@functools.lru_cache(maxsize=None)
def _oracle_table(backends: tuple[str, ...]) -> list[str]:
    return oracle_maglev(list(backends), TABLE_SIZE)


def table_backend(backends, src, dst, proto, sport=0, dport=0) -> str:
    table = _oracle_table(tuple(sorted(backends)))
    return table[oracle_hash(oracle_key(src, dst, proto, sport, dport)) % TABLE_SIZE]


# -- golden fixtures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fx", fixtures(), ids=lambda fx: fx.description)
def test_golden_fixture(golden_xdp, fx) -> None:
    xdp = golden_xdp
    action, out = xdp.test_run(fx.frame)
    assert action == VERDICT[fx.action]
    reference = golden_balancer()  # fresh: its figures after this one frame are the program's
    verdict = reference.decide(fx.frame, now=0.0)
    assert action == VERDICT[verdict.action] and getattr(verdict, "reason", None) == fx.reason
    if fx.action in (Action.FORWARD, Action.REPLY):
        assert out.hex() == fx.output.hex() == verdict.frame.hex()
    elif fx.action == Action.PASS:
        assert out == fx.frame
    # Every figure as the core counts it; a connection entry written (a drop after the backend was
    # chosen leaves it too: WIRE.md sections 7, 8) is conn_new and conn_insert here.
    want = {k: v for k, v in reference.counters().items() if v and k not in ("connections", "connection_evictions")}
    if len(reference.connections):
        want.update(conn_new=1, conn_insert=1)
    assert nonzero(xdp) == want


# -- hand-built frames -------------------------------------------------------------------------------


def test_tcp_and_udp_forward_exact_bytes(xdp) -> None:
    for inner, flow in [
        (tcp(41000, seq=5, ack=9) / Raw(b"GET / HTTP/1.0\r\n\r\n"), (CLIENT, VIP, 6, 41000, 80)),
        (IP(src=CLIENT, dst=VIP, ttl=3, id=777) / UDP(sport=999, dport=53) / Raw(b"q" * 101), (CLIENT, VIP, 17, 999, 53)),
    ]:
        backend = expected_backend(*flow)
        expected = bytes(
            Ether(src=LB_MAC, dst=BACKENDS[backend])
            / IP(src=LB_ADDRESS, dst=backend, id=0, flags="DF", ttl=64, proto=47, tos=0)
            / GRE(proto=0x0800)
            / inner
        )
        action, out = xdp.test_run(wrapped(inner))
        assert action == XdpAction.TX
        assert out.hex() == expected.hex()
        assert IP(out[14:]).chksum == IP(bytes(IP(out[14:34]))).chksum  # scapy agrees with the checksum


def test_gre_with_checksum_key_and_sequence(xdp) -> None:
    inner = tcp(42000)
    frame = wrapped(inner, chksum_present=1, key_present=1, key=0xDEADBEEF, seqnum_present=1, sequence_number=3)
    assert len(frame) == 14 + 20 + 16 + len(inner)
    action, out = xdp.test_run(frame)
    assert action == XdpAction.TX
    assert out == forwarded(bytes(inner), expected_backend(CLIENT, VIP, 6, 42000, 80))


@pytest.mark.parametrize("extra", range(9))
def test_gre_checksum_over_every_tail_length(xdp, extra) -> None:
    """Payload lengths of every residue mod 4 (the word loop and its 1-3 byte tail)."""
    inner = IP(src=CLIENT, dst=VIP) / UDP(sport=2000 + extra, dport=53) / Raw(b"\xa5" * extra)
    frame = wrapped(inner, chksum_present=1)
    action, out = xdp.test_run(frame)
    assert action == XdpAction.TX, nonzero(xdp)
    assert out == forwarded(bytes(inner), expected_backend(CLIENT, VIP, 17, 2000 + extra, 53))
    # Corrupt the last byte of the payload: the tail must be part of the sum.
    broken = frame[:-1] + bytes([frame[-1] ^ 0x01])
    assert xdp.test_run(broken)[0] == XdpAction.DROP
    assert nonzero(xdp)["drop_gre_checksum"] == 1


@pytest.mark.parametrize("size", [1400, 1473, 3000])
def test_gre_checksum_on_large_frames(xdp, size) -> None:
    # A jumbo device: the output (as long as the input) fits the MTU toward the backend (section 8b).
    xdp.sync(desired(catch_all_state(BACKENDS, TABLE_SIZE), LB_ADDRESS, LB_MAC, ALL_BACKENDS, LB_ADDRESS6, 9000))
    inner = IP(src=CLIENT, dst=VIP) / UDP(sport=3000, dport=53) / Raw(bytes(range(256)) * (size // 256) + b"z" * (size % 256))
    frame = wrapped(inner, chksum_present=1)
    assert xdp.test_run(frame)[0] == XdpAction.TX
    broken = frame[:-2] + bytes([frame[-2] ^ 0x80]) + frame[-1:]
    assert xdp.test_run(broken)[0] == XdpAction.DROP
    assert nonzero(xdp) == {"forwarded": 1, "conn_new": 1, "conn_insert": 1, "drop_gre_checksum": 1}


def test_non_gre_passes_unchanged(xdp) -> None:
    frames = [
        bytes(Ether() / IP(dst=LB_ADDRESS) / UDP(dport=53)),
        bytes(Ether(type=0x86DD) / Raw(b"\x60" + b"\x00" * 60)),
        bytes(Ether())[:14] + b"\x45",  # runt
    ]
    for frame in frames:
        assert xdp.test_run(frame) == (XdpAction.PASS, frame)
    assert nonzero(xdp) == {"passed": 3}


def test_fragments_follow_the_three_tuple(xdp) -> None:
    first = IP(src=CLIENT, dst=VIP, flags="MF", id=5, proto=17) / Raw(b"a" * 64)
    later = IP(src=CLIENT, dst=VIP, frag=8, id=5, proto=17) / Raw(b"b" * 10)
    want = expected_backend(CLIENT, VIP, 17)
    assert backend_of(xdp, wrapped(first)) == want
    assert backend_of(xdp, wrapped(later)) == want
    assert xdp.connection(oracle_key(CLIENT, VIP, 17)).backend == IPv4Address(want)


def icmp_frag_needed(sport: int):
    """The router's "fragmentation needed" about a packet VIP:80 -> CLIENT:sport (the reply direction)."""
    return (IP(src="10.9.9.9", dst=VIP) / ICMP(type=3, code=4, nexthopmtu=1400)
            / IP(src=VIP, dst=CLIENT, flags="DF") / TCP(sport=80, dport=sport, flags="A"))


def moved_flow(old, new, proto=6) -> int:
    """A client port whose flow the old and the new backend set put on different backends."""
    for sport in range(20000, 30000):
        a = table_backend(old, CLIENT, VIP, proto, sport, 80)
        if a in new and a != table_backend(new, CLIENT, VIP, proto, sport, 80):
            return sport
    raise AssertionError("no moved flow")


def test_icmp_frag_needed_routed_like_its_flow(xdp) -> None:
    old, new = list(BACKENDS), list(ALL_MACS)
    sport = moved_flow(old, new)
    first = backend_of(xdp, wrapped(tcp(sport)))
    assert backend_of(xdp, wrapped(icmp_frag_needed(sport))) == first
    sync(xdp, new)  # the table now sends this flow elsewhere; its connection entry keeps it
    assert backend_of(xdp, wrapped(icmp_frag_needed(sport))) == first
    assert backend_of(xdp, wrapped(tcp(sport))) == first
    # With no connection entry, the ICMP error follows the new table, like its flow would.
    xdp.clear_connections()
    assert backend_of(xdp, wrapped(icmp_frag_needed(sport))) == table_backend(new, CLIENT, VIP, 6, sport, 80)


def test_connections_stick_after_the_table_changes(xdp) -> None:
    old, new = list(BACKENDS), list(ALL_MACS)
    ports = range(50000, 50200)
    before = {p: backend_of(xdp, wrapped(tcp(p))) for p in ports}
    assert before == {p: table_backend(old, CLIENT, VIP, 6, p, 80) for p in ports}
    sync(xdp, new)
    counters.reset(xdp)
    assert {p: backend_of(xdp, wrapped(tcp(p))) for p in ports} == before
    assert nonzero(xdp)["conn_hit"] == len(ports)
    moved = [p for p in ports if table_backend(new, CLIENT, VIP, 6, p, 80) != before[p]]
    assert moved, "the new table must move some flows for this test to mean anything"
    # New flows follow the new table.
    for p in range(60000, 60050):
        assert backend_of(xdp, wrapped(tcp(p))) == table_backend(new, CLIENT, VIP, 6, p, 80)


def test_flows_of_a_removed_backend_move(xdp) -> None:
    gone = "10.2.0.2"
    ports = [p for p in range(51000, 51300) if table_backend(BACKENDS, CLIENT, VIP, 6, p, 80) == gone][:20]
    for p in ports:
        assert backend_of(xdp, wrapped(tcp(p))) == gone
    rest = [b for b in BACKENDS if b != gone]
    sync(xdp, rest)
    for p in ports:
        assert backend_of(xdp, wrapped(tcp(p))) == table_backend(rest, CLIENT, VIP, 6, p, 80)
        assert xdp.connection(oracle_key(CLIENT, VIP, 6, p, 80)).backend != IPv4Address(gone)


def test_a_reused_backend_index_does_not_inherit_flows(xdp) -> None:
    gone, newcomer = "10.2.0.2", "10.2.0.4"
    index = backend_index(xdp, gone)
    p = next(p for p in range(52000, 53000) if table_backend(BACKENDS, CLIENT, VIP, 6, p, 80) == gone)
    assert backend_of(xdp, wrapped(tcp(p))) == gone
    now = [b for b in BACKENDS if b != gone]
    sync(xdp, now)  # a freed index is reused only by a later change, never while the table names it
    now.append(newcomer)
    sync(xdp, now)
    assert backend_index(xdp, newcomer) == index
    assert backend_of(xdp, wrapped(tcp(p))) == table_backend(now, CLIENT, VIP, 6, p, 80)


def test_idle_timeout(xdp) -> None:
    p = 53000
    key = oracle_key(CLIENT, VIP, 6, p, 80)
    table_choice = table_backend(BACKENDS, CLIENT, VIP, 6, p, 80)
    other = next(b for b in BACKENDS if b != table_choice)
    # bpf_ktime_get_ns() is CLOCK_MONOTONIC: a fresh entry is honoured and refreshed...
    stamp = time.monotonic_ns()
    xdp.write_connection(key, other, stamp)
    assert backend_of(xdp, wrapped(tcp(p))) == other
    assert xdp.connection(key).last_seen_ns > stamp
    # ...one idle for longer than the TCP timeout (300 s) is not, and is rewritten from the table.
    xdp.write_connection(key, other, max(1, time.monotonic_ns() - 301 * 10**9))
    assert backend_of(xdp, wrapped(tcp(p))) == table_choice
    assert xdp.connection(key).backend == IPv4Address(table_choice)
    # Per protocol: a UDP entry 61 s old is past the UDP timeout (60 s).
    ukey = oracle_key(CLIENT, VIP, 17, p, 53)
    uchoice = table_backend(BACKENDS, CLIENT, VIP, 17, p, 53)
    uother = next(b for b in BACKENDS if b != uchoice)
    xdp.write_connection(ukey, uother, max(1, time.monotonic_ns() - 61 * 10**9))
    assert backend_of(xdp, wrapped(IP(src=CLIENT, dst=VIP) / UDP(sport=p, dport=53))) == uchoice


def test_a_hit_never_moves_a_stamp_back(xdp) -> None:
    """A stamp ahead of this CPU's tick (another CPU's, whose tick began later) is left as it is: a hit
    writes the entry only when the tick has moved past its stamp (docs/WIRE.md section 7)."""
    p = 53100
    key = oracle_key(CLIENT, VIP, 6, p, 80)
    other = next(b for b in BACKENDS if b != table_backend(BACKENDS, CLIENT, VIP, 6, p, 80))
    ahead = time.monotonic_ns() + 10**9
    xdp.write_connection(key, other, ahead)
    assert backend_of(xdp, wrapped(tcp(p))) == other
    assert backend_of(xdp, wrapped(tcp(p))) == other
    assert xdp.connection(key).last_seen_ns == ahead


def test_an_expired_entry_gets_its_flows_hash_back(xdp) -> None:
    """An expired entry naming the table's backend but holding another hash is rewritten whole (the
    in-place restamp is only for an entry that already holds what an update would write)."""
    p = 53200
    key = oracle_key(CLIENT, VIP, 6, p, 80)
    choice = table_backend(BACKENDS, CLIENT, VIP, 6, p, 80)
    conn = m.RrConn(backend_index=backend_index(xdp, choice), flow_hash=oracle_hash(key) ^ 1,
                    last_seen_ns=max(1, time.monotonic_ns() - 301 * 10**9))
    conn.backend_addr = (ctypes.c_uint8 * 16)(*m.identity(int(IPv4Address(choice))))
    libbpf.map_update(xdp.fds[m.conn_map(key)], key, conn)
    assert backend_of(xdp, wrapped(tcp(p))) == choice
    assert xdp.connection(key).flow_hash == oracle_hash(key)


def test_no_backend(xdp) -> None:
    sync(xdp, [])
    assert xdp.test_run(wrapped(tcp(1234)))[0] == XdpAction.DROP
    assert nonzero(xdp) == {"drop_no_backend": 1}


def test_drained_backends_keep_their_connections(xdp) -> None:
    """All weights 0: no table slots, so new flows find no backend; existing ones carry on."""
    p = 54000
    first = backend_of(xdp, wrapped(tcp(p)))
    sync(xdp, list(BACKENDS), weights={b: 0 for b in BACKENDS})
    assert xdp.read_config().catch_all_size == 0
    assert backend_of(xdp, wrapped(tcp(p))) == first
    assert xdp.test_run(wrapped(tcp(p + 1)))[0] == XdpAction.DROP
    assert nonzero(xdp)["drop_no_backend"] == 1


def test_no_neighbour_then_resolved(xdp) -> None:
    p = 55000
    backend = expected_backend(CLIENT, VIP, 6, p, 80)
    sync(xdp, list(BACKENDS), macs={b: m for b, m in BACKENDS.items() if b != backend})
    assert xdp.test_run(wrapped(tcp(p)))[0] == XdpAction.DROP
    assert nonzero(xdp) == {"drop_no_neighbour": 1, "conn_new": 1, "conn_insert": 1}
    # The flow was recorded for its backend (as core/balancer.py does) and goes there once resolved.
    assert xdp.connection(oracle_key(CLIENT, VIP, 6, p, 80)).backend == IPv4Address(backend)
    sync(xdp, list(BACKENDS), macs={**BACKENDS, backend: "02:00:00:00:09:09"})
    action, out = xdp.test_run(wrapped(tcp(p)))
    assert action == XdpAction.TX and out[:6] == mac_to_bytes("02:00:00:00:09:09")


def test_hash_seed_comes_from_the_config(xdp) -> None:
    seed = 0x12345678
    reference = Balancer(LB_ADDRESS, mac_to_bytes(LB_MAC), golden_services(), hash_seed=seed, local_address6=LB_ADDRESS6)
    for b, mac in ALL_BACKENDS.items():
        reference.set_neighbour(b, mac_to_bytes(mac))
    mirror(xdp, reference)
    assert xdp.read_config().hash_seed == seed
    for p in range(100):
        frame = wrapped(tcp(10000 + p))
        assert xdp.test_run(frame)[1] == reference.decide(frame, now=0.0).frame


def test_smaller_prime_table() -> None:
    with XdpProgram(table_size=251, conn_capacity=64) as x:
        service = catch_all(list(ALL_MACS), 251)
        reference = Balancer(LB_ADDRESS, mac_to_bytes(LB_MAC), [service])
        for b, mac in ALL_MACS.items():
            reference.set_neighbour(b, mac_to_bytes(mac))
        mirror(x, reference)
        table = service.table
        assert x.read_table(0, 251) == [backend_index(x, table.backends[i]) for i in table.slots]
        for p in range(200):  # more flows than the connection table holds: LRU eviction is harmless
            frame = wrapped(tcp(p))
            assert x.test_run(frame)[1] == reference.decide(frame, now=0.0).frame
        assert len(x.connections()) <= 64 + 2 * os.cpu_count()


def test_table_larger_than_the_map_is_refused() -> None:
    with XdpProgram(table_size=251, conn_capacity=64) as x:
        with pytest.raises(ValueError):
            x.sync(desired(catch_all_state(list(BACKENDS), 257), LB_ADDRESS, LB_MAC, BACKENDS))
        assert x.image.config is None  # nothing was written


def test_timed_run(xdp) -> None:
    action, out, ns = xdp.test_run_timed(wrapped(tcp(7)), repeat=2000)
    assert action == XdpAction.TX and ns > 0
    assert nonzero(xdp)["forwarded"] == 2000


# -- differential: random and mutated frames against the Python core ---------------------------------


def _random_inner(rng: random.Random):
    src = f"10.0.{rng.randrange(4)}.{rng.randrange(1, 255)}"
    kind = rng.randrange(6)
    ip = dict(src=src, dst=VIP, tos=rng.choice([0, 0x10, 0xB8]))
    if rng.random() < 0.2:
        ip["options"] = b"\x01" * (4 * rng.randrange(1, 4))
    if kind == 0:
        return IP(**ip) / TCP(sport=rng.randrange(1, 65536), dport=rng.choice([80, 443]), flags="S")
    if kind == 1:
        return IP(**ip) / UDP(sport=rng.randrange(1, 65536), dport=53) / Raw(b"d" * rng.randrange(0, 40))
    if kind == 2:
        return IP(**ip) / ICMP(type=8) / Raw(b"p" * rng.randrange(0, 9))
    if kind == 3:
        return IP(flags="MF", id=rng.randrange(65536), **ip) / UDP(sport=rng.randrange(65536), dport=53) / Raw(b"f" * 24)
    if kind == 4:
        return icmp_frag_needed(rng.randrange(1, 65536))
    return IP(proto=rng.choice([47, 50, 132]), **ip) / Raw(b"o" * rng.randrange(0, 30))


def _random_frame(rng: random.Random) -> bytes:
    gre = {}
    if rng.random() < 0.3:
        gre.update(chksum_present=1)
    if rng.random() < 0.3:
        gre.update(key_present=1, key=rng.randrange(1 << 32))
    if rng.random() < 0.3:
        gre.update(seqnum_present=1, sequence_number=rng.randrange(1 << 32))
    frame = wrapped(_random_inner(rng), **gre)
    if rng.random() < 0.2:
        frame += b"\x00" * rng.randrange(1, 20)
    return frame


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    for _ in range(rng.randrange(1, 3)):
        i = rng.randrange(14, len(b))
        b[i] ^= 1 << rng.randrange(8)
    if rng.random() < 0.2:
        del b[rng.randrange(14, len(b)):]
    if rng.random() < 0.5 and len(b) >= 34:  # keep the outer checksum right, to reach the deeper checks
        from rusty_rail.core.checksum import internet_checksum

        b[24:26] = b"\x00\x00"
        b[24:26] = internet_checksum(bytes(b[14:34])).to_bytes(2, "big")
    return bytes(b)


def _compare(x: XdpProgram, reference: Balancer, frame: bytes) -> None:
    before = counters.stats(x)
    action, out = x.test_run(frame)
    after = counters.stats(x)
    verdict = reference.decide(frame, now=0.0)
    assert action == VERDICT[verdict.action], (frame.hex(), verdict)
    if verdict.action == Action.FORWARD:
        assert out.hex() == verdict.frame.hex()
    elif verdict.action == Action.DROP:
        changed = [i for i in range(1, 19) if after[i] != before[i]]
        assert changed == [int(verdict.reason)], (frame.hex(), verdict, changed)


def test_differential_random_frames(xdp) -> None:
    rng = random.Random(20240601)
    reference = golden_balancer()
    for _ in range(400):
        _compare(xdp, reference, _random_frame(rng))


def test_differential_mutated_frames(xdp) -> None:
    rng = random.Random(7)
    reference = golden_balancer()
    reasons = set()
    for _ in range(1500):
        frame = _mutate(rng, _random_frame(rng))
        if len(frame) < 14:
            continue
        _compare(xdp, reference, frame)
        verdict = reference.decide(frame, now=0.0)
        reasons.add(getattr(verdict, "reason", None))
    assert len(reasons) > 8  # the mutations reached many different checks
