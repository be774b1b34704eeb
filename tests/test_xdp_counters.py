"""Per-backend figures of the XDP program (rr_backend_stats) and the connection-table walk, against the
Python core, through BPF_PROG_TEST_RUN; then XdpDataplane.counters()/explain() over a loaded (not
attached) program.

Every forwarded frame is tallied independently here (backend = the output's outer destination, bytes =
the inner packet's total length, as core/balancer.py counts) and the kernel's per-(service, backend)
figures must equal that tally and BalancerDataplane's figures for the same frames, exactly, in open
mode and in services mode; slots reused by another address or by another service start from zero.
Needs root (loading BPF).
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from ipaddress import IPv4Address

import pytest

from rusty_rail.bpf import libbpf
from rusty_rail.control.balancer_dataplane import BalancerDataplane
from rusty_rail.control.model import DataplaneState
from rusty_rail.core.balancer import Balancer
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import ServiceKey
from rusty_rail.engines import xdp_maps as m
from rusty_rail.engines.xdp import XdpAction, XdpBalancer, default_object_path
from rusty_rail.engines.xdp_dataplane import XdpDataplane
from tests.test_xdp_differential import LB_ADDRESS, LB_MAC, POOL, VERDICT, addr, ipv4
from tests.test_xdp_services import CLIENTS, tcp, udp, wrap

pytestmark = [
    pytest.mark.netns,  # root only
    pytest.mark.skipif(not default_object_path().exists(), reason="run `make bpf` first"),
]

TABLE_SIZE = 61
B = sorted(POOL)  # 10.2.0.1 .. 10.2.0.5

class Expected:
    """The independent tally: what each forwarded frame adds to its (service, backend)."""

    def __init__(self) -> None:
        self.packets: Counter = Counter()
        self.bytes: Counter = Counter()

    def add(self, service: ServiceKey | None, frame: bytes, out: bytes) -> None:
        backend = IPv4Address(out[30:34])
        inner_total = struct.unpack("!H", out[40:42])[0]  # the inner header follows 38 bytes of output headers
        self.packets[(service, backend)] += 1
        self.bytes[(service, backend)] += inner_total

    def figures(self) -> dict:
        return {k: (self.packets[k], self.bytes[k]) for k in self.packets}

    def forget(self, service: ServiceKey | None, backend: str) -> None:
        self.packets.pop((service, IPv4Address(backend)), None)
        self.bytes.pop((service, IPv4Address(backend)), None)


def run(reference: Balancer, x: XdpBalancer, frame: bytes, expected: Expected, service=None) -> str | None:
    """`frame` through both engines (they must agree); a forward is added to `expected`."""
    verdict = reference.decide(frame, now=time.monotonic())
    action, out = x.test_run(frame)
    assert action == VERDICT[verdict.action], (frame.hex(), verdict)
    if action != XdpAction.TX:
        return None
    assert out == verdict.frame
    expected.add(service, frame, out)
    return str(IPv4Address(out[30:34]))


def nonzero(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if v != (0, 0)}


def assert_figures(reference: Balancer, x: XdpBalancer, expected: Expected) -> None:
    kernel = x.backend_stats()
    python = BalancerDataplane(reference).counters()["backends"]
    assert set(kernel) == set(python)               # the same (service, backend) pairs are listed
    assert kernel == python                         # with the same figures
    assert nonzero(kernel) == expected.figures()    # which are what was forwarded


def assert_connections(reference: Balancer, x: XdpBalancer) -> None:
    total, flows = x.connection_summary()
    assert total == len(reference.connections)
    assert flows == {IPv4Address(b): n for b, n in Counter(b for _, b in reference.connections.items()).items()}


@pytest.fixture(scope="module")
def program():
    with XdpBalancer(table_size=TABLE_SIZE, conn_capacity=1 << 14, max_services=4) as x:
        yield x


@pytest.fixture
def clean(program):
    program.clear_connections()
    program.reset_stats()
    return program


def open_reference(backends, macs=POOL) -> Balancer:
    reference = Balancer(LB_ADDRESS, LB_MAC, backends, table_size=TABLE_SIZE)
    for b, mac in macs.items():
        reference.set_neighbour(b, mac)
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


def flow_key(frame: bytes) -> FlowKey:
    inner = frame[38 + (8 if frame[34] & 0x30 else 0):]
    return FlowKey(IPv4Address(inner[12:16]), IPv4Address(inner[16:20]), inner[9], *struct.unpack("!HH", inner[20:24]))


# -- open mode -----------------------------------------------------------------------------------------


def test_open_mode_figures_are_exact(clean) -> None:
    x, expected = clean, Expected()
    reference = open_reference(B[:3])
    x.sync_from_balancer(reference)
    assert nonzero(x.backend_stats()) == {}
    frames = varied_frames(40)
    for _ in range(3):                      # first round: table path; then connection hits
        for f in frames:
            assert run(reference, x, f, expected) is not None
    assert x.counters()["conn_new"] == 40 and x.counters()["conn_hit"] == 80
    assert_figures(reference, x, expected)
    assert len({b for (_, b) in expected.figures()}) == 3   # every backend took some flows
    assert_connections(reference, x)


def test_drops_are_not_counted_per_backend(clean) -> None:
    x, expected = clean, Expected()
    reference = open_reference(B[:2], macs={B[0]: POOL[B[0]]})  # B[1]'s next hop unknown
    x.sync_from_balancer(reference)
    for f in varied_frames(20):
        run(reference, x, f, expected)
    assert 0 < x.counters()["drop_no_neighbour"] < 20
    assert_figures(reference, x, expected)
    assert {b for (_, b) in expected.figures()} == {IPv4Address(B[0])}


@pytest.fixture
def fresh():
    """A program of its own: backend and service indices are handed out from the start (0, 1, ...)."""
    with XdpBalancer(table_size=TABLE_SIZE, conn_capacity=1 << 12, max_services=2) as x:
        yield x


def test_a_reused_index_starts_from_zero(fresh) -> None:
    x, expected = fresh, Expected()
    reference = open_reference(B[:2])
    x.sync_from_balancer(reference)
    frames = varied_frames(16)
    for f in frames:
        run(reference, x, f, expected)
    gone = x.backend_index(B[1])
    reference.set_backends([B[0]])          # B[1] leaves; its index is freed
    x.sync_from_balancer(reference)
    expected.forget(None, B[1])
    assert_figures(reference, x, expected)
    reference.set_backends([B[0], B[2]])    # B[2] takes B[1]'s index, and none of its counts
    x.sync_from_balancer(reference)
    assert x.backend_index(B[2]) == gone
    assert x.backend_stats()[(None, IPv4Address(B[2]))] == (0, 0)
    for f in frames:
        run(reference, x, f, expected)
    assert_figures(reference, x, expected)
    reference.set_backends([B[0], B[1], B[2]])  # B[1] again, at a new index, from zero
    x.sync_from_balancer(reference)
    assert x.backend_stats()[(None, IPv4Address(B[1]))] == (0, 0)
    assert_figures(reference, x, expected)


# -- services mode --------------------------------------------------------------------------------------

S80 = ServiceKey.parse("10.1.0.1:80/tcp")
S53 = ServiceKey.parse("10.1.0.1:53/udp")
SANY = ServiceKey.parse("10.1.0.2")


def services_reference(config) -> Balancer:
    reference = Balancer(LB_ADDRESS, LB_MAC, table_size=TABLE_SIZE, services=True)
    set_services(reference, config)
    for b, mac in POOL.items():
        reference.set_neighbour(b, mac)
    return reference


def set_services(reference: Balancer, config) -> None:
    for key in list(reference.services):
        if key not in config:
            reference.remove_service(key)
    for key, backends in config.items():
        reference.set_service(key, list(backends), {b: 1 for b in backends})


def services_frames() -> list[tuple[ServiceKey, bytes]]:
    out = []
    for i in range(24):
        out.append((S80, wrap(tcp(42000 + i, 80, src=CLIENTS[i % 2]))))
        out.append((S53, wrap(udp(42000 + i, 53, src=CLIENTS[i % 2]), padding=bytes(i % 3))))
        out.append((SANY, wrap(udp(42000 + i, 9000 + i, dst="10.1.0.2"))))
    return out


def test_services_mode_figures_are_exact(clean) -> None:
    x, expected = clean, Expected()
    # B[0] is in all three services: its figures are kept per service.
    reference = services_reference({S80: B[0:2], S53: [B[0], B[2]], SANY: [B[0], B[3], B[4]]})
    x.sync_from_balancer(reference)
    frames = services_frames()
    for _ in range(2):
        for service, f in frames:
            assert run(reference, x, f, expected, service) is not None
    assert_figures(reference, x, expected)
    assert {s for (s, b) in expected.figures() if b == IPv4Address(B[0])} == {S80, S53, SANY}
    assert_connections(reference, x)
    # Dropped as NO_SERVICE: counted nowhere per backend.
    run(reference, x, wrap(tcp(1, 81)), expected)
    assert x.counters()["drop_no_service"] == 1
    assert_figures(reference, x, expected)


def test_services_leave_rejoin_and_reuse_start_from_zero(fresh) -> None:
    x, expected = fresh, Expected()
    config = {S80: B[0:2], S53: [B[0], B[2]]}
    reference = services_reference(config)
    x.sync_from_balancer(reference)
    frames = services_frames()
    for service, f in frames:
        if service != SANY:
            run(reference, x, f, expected, service)
    # B[1] leaves S80 and comes back: from zero, as core's Pool (its connection entries do not count).
    set_services(reference, {S80: [B[0]], S53: [B[0], B[2]]})
    x.sync_from_balancer(reference)
    expected.forget(S80, B[1])
    assert_figures(reference, x, expected)
    set_services(reference, config)
    x.sync_from_balancer(reference)
    assert x.backend_stats()[(S80, IPv4Address(B[1]))] == (0, 0)
    assert_figures(reference, x, expected)
    # S53 goes; SANY takes its service index: none of S53's counts show up under SANY.
    index = x.service_index(S53)
    set_services(reference, {S80: B[0:2]})
    x.sync_from_balancer(reference)
    expected.forget(S53, B[0])
    expected.forget(S53, B[2])
    set_services(reference, {S80: B[0:2], SANY: [B[0], B[2]]})
    x.sync_from_balancer(reference)
    assert x.service_index(SANY) == index
    assert x.backend_stats()[(SANY, IPv4Address(B[0]))] == (0, 0)
    assert x.backend_stats()[(SANY, IPv4Address(B[2]))] == (0, 0)
    for service, f in frames:
        if service != S53:
            run(reference, x, f, expected, service)
    assert_figures(reference, x, expected)
    # Back to open mode: service 0's slots start from zero too.
    reference = open_reference(B[:2])
    x.sync_from_balancer(reference)
    assert nonzero(x.backend_stats()) == {}


# -- the connection walk ------------------------------------------------------------------------------------


def test_connection_summary_counts_and_limit(clean) -> None:
    x, expected = clean, Expected()
    reference = open_reference(B[:3])
    x.sync_from_balancer(reference)
    assert x.connection_summary() == (0, {})
    for i in range(3000):  # more than one batch of the walk at a small chunk, below
        run(reference, x, wrap(udp(1000 + i % 60000, 53, src=f"10.0.{i // 250}.{i % 250}")), expected)
    assert_connections(reference, x)
    total, flows = x.connection_summary(flow_limit=2999)
    assert (total, flows) == (3000, None)
    assert x.connection_summary(flow_limit=3000)[1] is not None
    chunks = list(libbpf.map_lookup_batches(x._fd[m.MAP_CONNS], 16, 16, chunk=256))
    assert len(chunks) > 1 and sum(n for n, _, _ in chunks) == 3000
    assert len({keys[i : i + 16] for _, keys, _ in chunks for i in range(0, len(keys), 16)}) == 3000  # none twice


# -- connection evictions (derived: the kernel does not count them) -----------------------------------


def flood(x: XdpBalancer, reference: Balancer, start: int, n: int) -> None:
    expected = Expected()
    for i in range(start, start + n):  # distinct flows: a new entry each
        run(reference, x, wrap(udp(1000 + i % 60000, 53, src=f"10.0.{i // 60000}.{1 + i % 200}")), expected)


def test_connection_evictions_identity() -> None:
    """Far more flows than a 64-entry table: evictions = inserted - live, exactly (the per-CPU free
    lists of the kernel's LRU may evict a little before the table is full: no fixed number)."""
    with XdpBalancer(table_size=TABLE_SIZE, conn_capacity=64, max_services=1) as x:
        reference = open_reference(B[:3])
        x.sync_from_balancer(reference)
        assert x.connection_evictions() == 0
        flood(x, reference, 0, 10)
        live = x.connection_summary()[0]
        assert x.counters()["conn_insert"] == 10
        assert x.connection_evictions() == 10 - live == x.connection_evictions(live)
        flood(x, reference, 10, 990)
        live = x.connection_summary()[0]
        assert 0 < live <= 64
        assert x.counters()["conn_insert"] == 1000
        evictions = x.connection_evictions()
        assert evictions == 1000 - live and evictions >= 1000 - 64
        for c in x.connections()[:5]:
            assert x.delete_connection(c.key)
        assert x.connection_evictions() == evictions  # Python's deletions are not evictions
        x.reset_stats()                               # nor does zeroing rr_stats lose the inserts
        assert x.connection_evictions() == evictions
        removed = x.clear_connections()
        assert removed == live - 5 and x.connection_evictions() == evictions
        # A table that has never been full (after the clear): inserts without evictions.
        flood(x, reference, 5000, 20)
        assert x.connection_evictions() - evictions == 20 - x.connection_summary()[0]


def test_connection_evictions_zero_below_capacity(clean) -> None:
    x, reference = clean, open_reference(B[:3])
    x.sync_from_balancer(reference)
    before = x.connection_evictions()
    flood(x, reference, 0, 500)  # 500 of 16384 entries
    flood(x, reference, 0, 500)  # the same flows again: hits, no inserts
    assert x.connection_summary()[0] == 500 and x.counters()["conn_insert"] == 500
    assert x.connection_evictions() == before == 0
    key = x.connections()[0].key
    assert x.delete_connection(key)
    x.write_connection(key, B[0], time.monotonic_ns())  # written by Python: part of the baseline
    assert x.connection_evictions() == 0


def test_connection_evictions_baseline_of_a_reused_table() -> None:
    """A handover's table: the entries live at start are the baseline, not evictions."""
    with XdpBalancer(table_size=TABLE_SIZE, conn_capacity=64, max_services=1) as first:
        reference = open_reference(B[:3])
        first.sync_from_balancer(reference)
        flood(first, reference, 0, 30)
        live = first.connection_summary()[0]
        fd = first._fd[m.MAP_CONNS]
        with XdpBalancer(table_size=TABLE_SIZE, conn_capacity=64, max_services=1, reuse_conns_fd=fd) as second:
            second.sync_from_balancer(reference)
            assert second.connection_summary()[0] == live
            assert second.connection_evictions() == 0
            flood(second, reference, 1000, 500)
            assert second.counters()["conn_insert"] == 500
            assert second.connection_evictions() == 500 + live - second.connection_summary()[0] > 0


# -- XdpDataplane over a loaded program (not attached: no device needed) ------------------------------


def test_dataplane_counters_and_explain_round_trip() -> None:
    expected = Expected()
    dp = XdpDataplane("unused0", lambda: open_reference([B[0]]), conn_capacity=1 << 12)
    engine = dp.engine
    # What XdpEngine._run does before attaching: build the balancer, load, copy the maps.
    balancer = engine.balancer_factory()
    x = XdpBalancer(table_size=balancer.table_size, conn_capacity=1 << 12, max_services=1)
    try:
        engine.balancer, engine.xdp = balancer, x
        dp.apply(DataplaneState(open_backends={IPv4Address(B[0]): 1, IPv4Address(B[1]): 1}))
        x.sync_from_balancer(balancer)
        frames = varied_frames(30)
        for f in frames:
            run(balancer, x, f, expected)
        keys = [flow_key(f) for f in frames]
        assert len(set(keys)) == 30
        c = dp.counters()
        assert c["forwarded"] == 30
        assert c["backends"] == expected.figures() == BalancerDataplane(balancer).counters()["backends"]
        assert c["connections"] == 30
        assert c["flows"] == {b: n for (_, b), (n, _) in expected.figures().items()}
        assert c["connection_evictions"] == 0  # 30 flows in 4096 entries: none evicted
        for key in keys:
            assert dp.explain(key)[1] == "connection entry"
            assert dp.explain(key)[0] == balancer.explain(key, time.monotonic())[0]
        # A backend added by the control plane shows up at once, from zero.
        dp.apply(DataplaneState(open_backends={IPv4Address(b): 1 for b in B[:3]}))
        assert dp.counters()["backends"][(None, IPv4Address(B[2]))] == (0, 0)
    finally:
        engine.xdp = None
        x.close()
