"""Per-backend figures of the XDP program (rr_backend_stats), the connection-table walk and the derived
evictions (engines/xdp/counters.py), against the Python core, through BPF_PROG_TEST_RUN.

Every forwarded frame is tallied independently here (backend = the output's outer destination, bytes =
the inner packet's total length, as core/balancer.py counts) and the kernel's per-(service, backend)
figures must equal that tally and the Balancer's figures for the same frames, exactly, for the
environment form (one catch-all service) and for services with a VIP; slots reused by another address
or by another service start from zero. The engine's Counters and explain() over these figures are in
tests/test_xdp_engine.py. Needs root (loading BPF).
"""

from __future__ import annotations

import ctypes
import struct
import time
from collections import Counter
from ipaddress import IPv4Address, ip_address

import pytest

from rusty_rail.bpf import libbpf
from rusty_rail.core.balancer import Balancer
from rusty_rail.core.service import ServiceKey
from rusty_rail.dataplane import StateBuilder
from rusty_rail.engines.xdp import XdpAction, XdpProgram, counters, default_object_path
from rusty_rail.engines.xdp import maps as m
from tests.test_xdp_differential import LB_ADDRESS, LB_MAC, POOL, addr, ipv4
from tests.test_xdp_services import CLIENTS, tcp, udp, wrap
from tests.xdp_support import VERDICT, backend_index, mirror

pytestmark = [
    pytest.mark.netns,  # root only
    pytest.mark.skipif(not default_object_path().exists(), reason="run `make bpf` first"),
]

TABLE_SIZE = 61
B = sorted(POOL)  # 10.2.0.1 .. 10.2.0.5
ALL = ServiceKey.catch_all()

class Expected:
    """The independent tally: what each forwarded frame adds to its (service, backend)."""

    def __init__(self) -> None:
        self.packets: Counter = Counter()
        self.bytes: Counter = Counter()

    def add(self, service: ServiceKey, frame: bytes, out: bytes) -> None:
        backend = IPv4Address(out[30:34])
        inner_total = struct.unpack("!H", out[40:42])[0]  # the inner header follows 38 bytes of output headers
        self.packets[(service, backend)] += 1
        self.bytes[(service, backend)] += inner_total

    def figures(self) -> dict:
        return {k: (self.packets[k], self.bytes[k]) for k in self.packets}

    def forget(self, service: ServiceKey, backend: str) -> None:
        self.packets.pop((service, IPv4Address(backend)), None)
        self.bytes.pop((service, IPv4Address(backend)), None)


def run(reference: Balancer, x: XdpProgram, frame: bytes, expected: Expected, service=ALL) -> str | None:
    """`frame` through both engines (they must agree); a forward is added to `expected`."""
    verdict = reference.decide(frame, now=time.monotonic())
    action, out = x.test_run(frame)
    assert action == VERDICT[verdict.action], (frame.hex(), verdict)
    if action != XdpAction.TX:
        return None
    assert out == verdict.frame
    expected.add(service, frame, out)
    return str(ip_address(out[30:34] if out[12:14] == b"\x08\x00" else out[38:54]))


def nonzero(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if v != (0, 0)}


def assert_figures(reference: Balancer, x: XdpProgram, expected: Expected) -> None:
    kernel = counters.backend_figures(x)
    python = reference.backend_figures()
    assert set(kernel) == set(python)               # the same (service, backend) pairs are listed
    assert kernel == python                         # with the same figures
    assert nonzero(kernel) == expected.figures()    # which are what was forwarded


def assert_connections(reference: Balancer, x: XdpProgram) -> None:
    total, flows = counters.connection_summary(x)
    assert total == len(reference.connections)
    by_service = Counter((reference.pool_for(k).service.key, ip_address(b)) for k, b in reference.connections.items())
    assert flows == dict(by_service)


@pytest.fixture(scope="module")
def program():
    with XdpProgram(table_size=TABLE_SIZE, conn_capacity=1 << 14, max_services=4) as x:
        yield x


@pytest.fixture
def clean(program):
    program.clear_connections()
    counters.reset(program)
    return program


def configure(reference: Balancer, x: XdpProgram, config: dict[ServiceKey, list[str]]) -> None:
    """Both serve `config` (service -> backends, weight 1 each)."""
    state = StateBuilder(TABLE_SIZE).build({k: {IPv4Address(b): 1 for b in v} for k, v in config.items()})
    reference.set_services(state.services)
    mirror(x, reference)


def reference_of(config: dict[ServiceKey, list[str]], x: XdpProgram, macs=POOL) -> Balancer:
    reference = Balancer(LB_ADDRESS, LB_MAC)
    for b, mac in macs.items():
        reference.set_neighbour(b, mac)
    configure(reference, x, config)
    return reference


def varied_frames(n: int, dst: str = "10.1.0.1", dport: int = 80) -> list[bytes]:
    """Flows of different inner lengths; some with GRE key/sequence fields and outer padding (neither
    counts: the bytes are the inner packet's total length)."""
    frames = []
    for i in range(n):
        inner = tcp(41000 + i, dport, dst=dst) if i % 2 else udp(41000 + i, dport, dst=dst)
        inner = ipv4(addr(CLIENTS[i % 2]), addr(dst), inner[9], inner[20:] + bytes(i % 7))
        if i % 3 == 0:
            frames.append(wrap(inner, flags=0x3000, fields=struct.pack("!II", 7, i), padding=bytes(i % 4)))
        else:
            frames.append(wrap(inner))
    return frames


def figures(x: XdpProgram) -> dict:
    return nonzero(counters.backend_figures(x))


# -- the environment form: one catch-all service --------------------------------------------------------


def test_catch_all_figures_are_exact(clean) -> None:
    x, expected = clean, Expected()
    reference = reference_of({ALL: B[:3]}, x)
    assert figures(x) == {}
    frames = varied_frames(40)
    for _ in range(3):                      # first round: table path; then connection hits
        for f in frames:
            assert run(reference, x, f, expected) is not None
    named = counters.named(x)
    assert named["conn_new"] == 40 and named["conn_hit"] == 80
    assert_figures(reference, x, expected)
    assert len({b for (_, b) in expected.figures()}) == 3   # every backend took some flows
    assert_connections(reference, x)


def test_drops_are_not_counted_per_backend(clean) -> None:
    x, expected = clean, Expected()
    reference = reference_of({ALL: B[:2]}, x, macs={B[0]: POOL[B[0]]})  # B[1]'s next hop unknown
    for f in varied_frames(20):
        run(reference, x, f, expected)
    assert 0 < counters.named(x)["drop_no_neighbour"] < 20
    assert_figures(reference, x, expected)
    assert {b for (_, b) in expected.figures()} == {IPv4Address(B[0])}


@pytest.fixture
def fresh():
    """A program of its own: backend and service indices are handed out from the start (0, 1, ...)."""
    with XdpProgram(table_size=TABLE_SIZE, conn_capacity=1 << 12, max_services=2) as x:
        yield x


def test_a_reused_index_starts_from_zero(fresh) -> None:
    x, expected = fresh, Expected()
    reference = reference_of({ALL: B[:2]}, x)
    frames = varied_frames(16)
    for f in frames:
        run(reference, x, f, expected)
    gone = backend_index(x, B[1])
    configure(reference, x, {ALL: [B[0]]})          # B[1] leaves; its index is freed
    expected.forget(ALL, B[1])
    assert_figures(reference, x, expected)
    configure(reference, x, {ALL: [B[0], B[2]]})    # B[2] takes B[1]'s index, and none of its counts
    assert backend_index(x, B[2]) == gone
    assert counters.backend_figures(x)[(ALL, IPv4Address(B[2]))] == (0, 0)
    for f in frames:
        run(reference, x, f, expected)
    assert_figures(reference, x, expected)
    configure(reference, x, {ALL: B[:3]})           # B[1] again, at a new index, from zero
    assert counters.backend_figures(x)[(ALL, IPv4Address(B[1]))] == (0, 0)
    assert_figures(reference, x, expected)


# -- services with a VIP --------------------------------------------------------------------------------

S80 = ServiceKey.parse("10.1.0.1:80/tcp")
S53 = ServiceKey.parse("10.1.0.1:53/udp")
SANY = ServiceKey.parse("10.1.0.2")


def services_frames() -> list[tuple[ServiceKey, bytes]]:
    out = []
    for i in range(24):
        out.append((S80, wrap(tcp(42000 + i, 80, src=CLIENTS[i % 2]))))
        out.append((S53, wrap(udp(42000 + i, 53, src=CLIENTS[i % 2]), padding=bytes(i % 3))))
        out.append((SANY, wrap(udp(42000 + i, 9000 + i, dst="10.1.0.2"))))
    return out


def test_services_figures_are_exact(clean) -> None:
    x, expected = clean, Expected()
    # B[0] is in all three services: its figures are kept per service.
    reference = reference_of({S80: B[0:2], S53: [B[0], B[2]], SANY: [B[0], B[3], B[4]]}, x)
    frames = services_frames()
    for _ in range(2):
        for service, f in frames:
            assert run(reference, x, f, expected, service) is not None
    assert_figures(reference, x, expected)
    assert {s for (s, b) in expected.figures() if b == IPv4Address(B[0])} == {S80, S53, SANY}
    assert_connections(reference, x)
    # Dropped as NO_SERVICE: counted nowhere per backend.
    run(reference, x, wrap(tcp(1, 81)), expected)
    assert counters.named(x)["drop_no_service"] == 1
    assert_figures(reference, x, expected)


def test_services_leave_rejoin_and_reuse_start_from_zero(fresh) -> None:
    x, expected = fresh, Expected()
    config = {S80: B[0:2], S53: [B[0], B[2]]}
    reference = reference_of(config, x)
    frames = services_frames()
    for service, f in frames:
        if service != SANY:
            run(reference, x, f, expected, service)
    # B[1] leaves S80 and comes back: from zero, as core's Pool (its connection entries do not count).
    configure(reference, x, {S80: [B[0]], S53: [B[0], B[2]]})
    expected.forget(S80, B[1])
    assert_figures(reference, x, expected)
    configure(reference, x, config)
    assert counters.backend_figures(x)[(S80, IPv4Address(B[1]))] == (0, 0)
    assert_figures(reference, x, expected)
    # S53 goes; SANY takes its service index: none of S53's counts show up under SANY.
    index = x.image.service_index[S53]
    configure(reference, x, {S80: B[0:2]})
    expected.forget(S53, B[0])
    expected.forget(S53, B[2])
    configure(reference, x, {S80: B[0:2], SANY: [B[0], B[2]]})
    assert x.image.service_index[SANY] == index
    assert counters.backend_figures(x)[(SANY, IPv4Address(B[0]))] == (0, 0)
    assert counters.backend_figures(x)[(SANY, IPv4Address(B[2]))] == (0, 0)
    for service, f in frames:
        if service != S53:
            run(reference, x, f, expected, service)
    assert_figures(reference, x, expected)
    # To the environment form: the catch-all takes a used index, and starts from zero too.
    configure(reference, x, {ALL: B[:2]})
    assert x.image.service_index[ALL] in (0, 1)
    assert figures(x) == {}


# -- the connection walk ------------------------------------------------------------------------------------


def test_connection_summary_counts_and_limit(clean) -> None:
    x, expected = clean, Expected()
    reference = reference_of({ALL: B[:3]}, x)
    assert counters.connection_summary(x) == (0, {})
    for i in range(3000):  # more than one batch of the walk at a small chunk, below
        run(reference, x, wrap(udp(1000 + i % 60000, 53, src=f"10.0.{i // 250}.{i % 250}")), expected)
    assert_connections(reference, x)
    total, flows = counters.connection_summary(x, flow_limit=2999)
    assert (total, flows) == (3000, None)
    assert counters.connection_summary(x, flow_limit=3000)[1] is not None
    unwalked = counters.read(x, True, walk=False)
    assert (unwalked.connections, unwalked.flows, unwalked.forwarded) == (0, None, counters.read(x, True).forwarded)
    chunks = list(libbpf.map_lookup_batches(x.fds[m.MAP_CONNS], 16, ctypes.sizeof(m.RrConn), chunk=256))
    assert len(chunks) > 1 and sum(n for n, _, _ in chunks) == 3000
    assert len({keys[i : i + 16] for _, keys, _ in chunks for i in range(0, len(keys), 16)}) == 3000  # none twice


# -- connection evictions (derived: the kernel does not count them) -----------------------------------


def flood(x: XdpProgram, reference: Balancer, start: int, n: int) -> None:
    expected = Expected()
    for i in range(start, start + n):  # distinct flows: a new entry each
        run(reference, x, wrap(udp(1000 + i % 60000, 53, src=f"10.0.{i // 60000}.{1 + i % 200}")), expected)


def test_connection_evictions_identity() -> None:
    """Far more flows than a 64-entry table: evictions = inserted - live, exactly (the per-CPU free
    lists of the kernel's LRU may evict a little before the table is full: no fixed number)."""
    with XdpProgram(table_size=TABLE_SIZE, conn_capacity=64, max_services=1) as x:
        reference = reference_of({ALL: B[:3]}, x)
        evictions = lambda live=None: counters.connection_evictions(x, live)  # noqa: E731
        assert evictions() == 0
        flood(x, reference, 0, 10)
        live = counters.connection_summary(x)[0]
        assert counters.named(x)["conn_insert"] == 10
        assert evictions() == 10 - live == evictions(live)
        flood(x, reference, 10, 990)
        live = counters.connection_summary(x)[0]
        assert 0 < live <= 64
        assert counters.named(x)["conn_insert"] == 1000
        evicted = evictions()
        assert evicted == 1000 - live and evicted >= 1000 - 64
        for c in x.connections()[:5]:
            assert x.delete_connection(c.key)
        assert evictions() == evicted  # Python's deletions are not evictions
        counters.reset(x)              # nor does zeroing rr_stats lose the inserts
        assert evictions() == evicted
        removed = x.clear_connections()
        assert removed == live - 5 and evictions() == evicted
        # A table that has never been full (after the clear): inserts without evictions.
        flood(x, reference, 5000, 20)
        assert evictions() - evicted == 20 - counters.connection_summary(x)[0]


def test_connection_evictions_zero_below_capacity(clean) -> None:
    x = clean
    reference = reference_of({ALL: B[:3]}, x)
    before = counters.connection_evictions(x)
    flood(x, reference, 0, 500)  # 500 of 16384 entries
    flood(x, reference, 0, 500)  # the same flows again: hits, no inserts
    assert counters.connection_summary(x)[0] == 500 and counters.named(x)["conn_insert"] == 500
    assert counters.connection_evictions(x) == before == 0
    key = x.connections()[0].key
    assert x.delete_connection(key)
    x.write_connection(key, B[0], time.monotonic_ns())  # written by Python: part of the baseline
    assert counters.connection_evictions(x) == 0


def test_connection_evictions_baseline_of_a_reused_table() -> None:
    """A handover's table: the entries live at start are the baseline, not evictions."""
    with XdpProgram(table_size=TABLE_SIZE, conn_capacity=64, max_services=1) as first:
        reference = reference_of({ALL: B[:3]}, first)
        flood(first, reference, 0, 30)
        live = counters.connection_summary(first)[0]
        fd = first.fds[m.MAP_CONNS]
        with XdpProgram(table_size=TABLE_SIZE, conn_capacity=64, max_services=1, reuse_conns_fd=fd) as second:
            mirror(second, reference)
            assert counters.connection_summary(second)[0] == live
            assert counters.connection_evictions(second) == 0
            flood(second, reference, 1000, 500)
            assert counters.named(second)["conn_insert"] == 500
            assert counters.connection_evictions(second) == 500 + live - counters.connection_summary(second)[0] > 0


def test_both_families_entries_per_service_and_forwards_per_family() -> None:
    """The golden fixtures (IPv4 and IPv6 flows, IPv6 and mixed services): rr_conns and rr_conns6 are
    walked into entries per (service, backend) as the Python table's, and a device refusal comes off
    `forwarded` without pushing `forwarded_ipv6` above it (docs/WIRE.md section 9)."""
    from tests.fixtures.golden import fixtures, golden_balancer

    reference = golden_balancer()
    with XdpProgram(table_size=65537, conn_capacity=1 << 12, max_services=16) as x:
        mirror(x, reference)
        for fx in fixtures():
            verdict = reference.decide(fx.frame, now=time.monotonic())
            action, out = x.test_run(fx.frame)
            assert action == VERDICT[verdict.action] and (action != XdpAction.TX or out == verdict.frame)
        assert reference.connections.ipv6 > 0 and len(reference.connections) > reference.connections.ipv6
        assert_connections(reference, x)
        c = counters.read(x, True)
        assert (c.forwarded, c.forwarded_ipv6) == (reference.forwarded, reference.forwarded6)
        assert c.connections_ipv6 == reference.connections.ipv6
        refused = c.forwarded - c.forwarded_ipv6 + 1  # more than the IPv4 forwards: some IPv6 ones too
        r = counters.read(x, True, refused=refused)
        assert (r.forwarded, r.forwarded_ipv6, r.drops["tx_refused"]) == (c.forwarded_ipv6 - 1, c.forwarded_ipv6 - 1, refused)
