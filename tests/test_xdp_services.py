"""Services (docs/WIRE.md section 10): the XDP program (BPF_PROG_TEST_RUN) against the Python core.

Both engines hold the same services (a `DataplaneState` from a StateBuilder, given to the Balancer with
set_services and to the program through the map planner). Hand-written cases pin the lookup order, the
fragment and ICMP rules, the catch-all next to services with a VIP, drain, removal and connection
entries that no longer belong to their flow's service; a Hypothesis
differential runs generated frames (valid, malformed, for configured and unconfigured VIPs, ports and
protocols) through both with a service change in the middle, comparing verdicts, output bytes and
every counter (NO_SERVICE included). Needs root (loading BPF).
"""

from __future__ import annotations

import ctypes
import struct
import time
from collections import Counter
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rusty_rail.core.balancer import Balancer
from rusty_rail.core.service import ServiceKey, ServiceProtocol, lookup_entry
from rusty_rail.core.verdict import Action
from rusty_rail.dataplane import StateBuilder
from rusty_rail.engines.xdp import XdpAction, XdpProgram, counters, default_object_path
from rusty_rail.engines.xdp import maps as m
from tests.test_xdp_differential import LB_ADDRESS, LB_MAC, POOL, addr, ipv4, malformed, python_counters
from tests.xdp_support import VERDICT, backend_index, mirror, nonzero

pytestmark = [
    pytest.mark.netns,  # root only
    pytest.mark.skipif(not default_object_path().exists(), reason="run `make bpf` first"),
]

TABLE_SIZE = 61
CLIENTS = ["10.0.0.1", "10.0.0.2"]
VIPS = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.9"]  # 10.1.0.9 is never a service
TCP, UDP, ANY = ServiceProtocol.TCP, ServiceProtocol.UDP, ServiceProtocol.ANY
CANDIDATES = [
    ServiceKey(IPv4Address("10.1.0.1"), TCP, 80),
    ServiceKey(IPv4Address("10.1.0.1"), TCP, 443),
    ServiceKey(IPv4Address("10.1.0.1"), UDP, 53),
    ServiceKey(IPv4Address("10.1.0.1"), UDP, 0),       # every UDP port
    ServiceKey(IPv4Address("10.1.0.2"), ANY, 0),       # every port and protocol
    ServiceKey(IPv4Address("10.1.0.2"), TCP, 80),      # more specific than the line above
    ServiceKey(IPv4Address("10.1.0.3"), TCP, 8080),
    ServiceKey(IPv4Address("10.1.0.3"), UDP, 53),
    ServiceKey.catch_all(),                            # every VIP: after every service with one
]
B = sorted(POOL)  # 10.2.0.1 .. 10.2.0.5


# -- frames ------------------------------------------------------------------------------------------


def wrap(inner: bytes, flags: int = 0, fields: bytes = b"", padding: bytes = b"") -> bytes:
    outer = ipv4(addr("192.168.137.1"), addr(LB_ADDRESS), 47, struct.pack("!HH", flags, 0x0800) + fields + inner)
    return LB_MAC + bytes.fromhex("020000000001") + b"\x08\x00" + outer + padding


def tcp(sport: int, dport: int, dst: str = "10.1.0.1", src: str = CLIENTS[0], frag: int = 0) -> bytes:
    return ipv4(addr(src), addr(dst), 6, struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x10, 65535, 0, 0),
                frag=frag)


def udp(sport: int, dport: int, dst: str = "10.1.0.1", src: str = CLIENTS[0], frag: int = 0) -> bytes:
    return ipv4(addr(src), addr(dst), 17, struct.pack("!HHHH", sport, dport, 12, 0) + b"abcd", frag=frag)


def icmp_error(about: bytes, src: str = CLIENTS[0], dst: str = "10.1.0.1") -> bytes:
    """Type 3 code 4 (fragmentation needed) quoting `about` (a packet the backend sent to the client)."""
    return ipv4(addr(src), addr(dst), 1, struct.pack("!BBHI", 3, 4, 0, 1400) + about[:28])


ports = st.one_of(st.sampled_from([0, 53, 80, 443, 8080, 40000]), st.integers(0, 0xFFFF))
frag_fields = st.sampled_from([0, 0, 0, 0x4000, 0x2000, 0x0010, 0x2010])


@st.composite
def service_inner(draw) -> bytes:
    proto = draw(st.sampled_from([6, 6, 17, 17, 1, 47]))
    src = draw(st.sampled_from([addr(c) for c in CLIENTS]))
    dst = draw(st.sampled_from([addr(v) for v in VIPS]))
    frag = draw(frag_fields)
    if proto == 6:
        payload = struct.pack("!HHIIBBHHH", draw(ports), draw(ports), 0, 0, 0x50, 0x10, 65535, 0, 0)
    elif proto == 17:
        payload = struct.pack("!HHHH", draw(ports), draw(ports), 8, 0)
    elif proto == 1:
        icmp_type = draw(st.sampled_from([0, 3, 8, 11]))
        quoted_proto = draw(st.sampled_from([6, 17, 1]))
        quoted = ipv4(draw(st.sampled_from([addr(v) for v in VIPS])), src, quoted_proto,
                      struct.pack("!HH", draw(ports), draw(ports)) + bytes(4), frag=draw(frag_fields))
        payload = struct.pack("!BBHI", icmp_type, 0, 0, 0) + quoted[: draw(st.sampled_from([28, 28, 24, 20, 10]))]
    else:
        payload = draw(st.binary(max_size=8))
    return ipv4(src, dst, proto, payload + draw(st.binary(max_size=6)), tos=draw(st.integers(0, 255)), frag=frag)


@st.composite
def service_frame(draw) -> bytes:
    inner = draw(service_inner())
    k = draw(st.booleans())
    fields = draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big") if k else b""
    return wrap(inner, flags=(k << 13), fields=fields, padding=draw(st.binary(max_size=4)))


frames = st.one_of(service_frame(), service_frame(), service_frame(), malformed())


@st.composite
def pool(draw):
    """(backends, weights): a few of POOL, weights 0 (drained), 1 or 2."""
    backends = draw(st.lists(st.sampled_from(B), min_size=0, max_size=4, unique=True))
    return tuple(backends), tuple(draw(st.sampled_from([0, 1, 1, 2])) for _ in backends)


@st.composite
def services_config(draw, before=None):
    out = {}
    for key in CANDIDATES:
        if before is None:
            if bool(draw(st.integers(0, 3))) != key.is_catch_all:  # services 3 in 4, the catch-all 1 in 4
                out[key] = draw(pool())
            continue
        what = draw(st.sampled_from(["keep", "keep", "drain", "other", "absent"]))
        if what == "keep" and key in before:
            out[key] = before[key]
        elif what == "drain" and key in before and before[key][0]:
            backends, weights = before[key]
            i = draw(st.integers(0, len(backends) - 1))
            out[key] = (backends, weights[:i] + (0,) + weights[i + 1 :])
        elif what == "other":
            out[key] = draw(pool())
    return out


@st.composite
def scenario(draw):
    before = draw(services_config())
    after = draw(services_config(before))
    unresolved = draw(st.sets(st.sampled_from(B), max_size=1))
    batch = draw(st.lists(frames, min_size=16, max_size=16))
    return before, after, unresolved, batch, draw(st.integers(0, 16))


# -- both engines ------------------------------------------------------------------------------------


def apply(reference: Balancer, x: XdpProgram, config, unresolved=frozenset()) -> None:
    """Both serve `config`: {service: (backends, weights)}; next hops of `unresolved` unknown."""
    state = StateBuilder(TABLE_SIZE).build(
        {key: {IPv4Address(b): w for b, w in zip(backends, weights)} for key, (backends, weights) in config.items()})
    reference.set_services(state.services)
    for b, mac in POOL.items():
        reference.set_neighbour(b, None if b in unresolved else mac)
    mirror(x, reference)


def both(reference: Balancer, x: XdpProgram, frame: bytes):
    """Run `frame` through both; assert they agree; return the Python verdict."""
    verdict = reference.decide(frame, now=time.monotonic())
    if len(frame) < 14:  # the kernel refuses runts (EINVAL); the contract says PASS
        assert verdict.action == Action.PASS
        reference.passed -= 1  # not seen by the program: keep the counters comparable
        return verdict
    action, out = x.test_run(frame)
    assert action == VERDICT[verdict.action], (frame.hex(), verdict, nonzero(x))
    if verdict.action == Action.FORWARD:
        assert out.hex() == verdict.frame.hex()
    return verdict


def backend(reference: Balancer, x: XdpProgram, frame: bytes) -> str | None:
    verdict = both(reference, x, frame)
    return str(IPv4Address(verdict.frame[30:34])) if verdict.action == Action.FORWARD else None


def assert_counters_agree(reference: Balancer, x: XdpProgram) -> None:
    got, want, names = counters.stats(x), python_counters(reference), m.stat_names()
    assert ({names[i]: got[i] for i in names if i not in m.ENGINE_STATS}
            == {names[i]: want[i] for i in names if i not in m.ENGINE_STATS})


@pytest.fixture(scope="module")
def program():
    with XdpProgram(table_size=TABLE_SIZE, conn_capacity=1 << 14, max_services=len(CANDIDATES)) as x:
        yield x


@pytest.fixture
def pair(program):
    program.clear_connections()
    counters.reset(program)
    reference = Balancer(LB_ADDRESS, LB_MAC)
    mirror(program, reference)  # no services: a clean slate
    return reference, program


def svc(text: str) -> ServiceKey:
    return ServiceKey.parse(text)


# -- hand-written cases ------------------------------------------------------------------------------


def test_lookup_order_and_no_service(pair) -> None:
    reference, x = pair
    apply(reference, x, {
        svc("10.1.0.1:80/tcp"): ((B[0],), (1,)),
        svc("10.1.0.1:0/tcp"): ((B[1],), (1,)),
        svc("10.1.0.1"): ((B[2],), (1,)),
    })
    assert backend(reference, x, wrap(tcp(40000, 80))) == B[0]          # (vip, port, proto)
    assert backend(reference, x, wrap(tcp(40000, 81))) == B[1]          # (vip, any port, proto)
    assert backend(reference, x, wrap(udp(40000, 80))) == B[2]          # (vip, any port, any proto)
    assert backend(reference, x, wrap(ipv4(addr(CLIENTS[0]), addr("10.1.0.1"), 1, bytes(8)))) == B[2]
    assert backend(reference, x, wrap(tcp(40000, 80, dst="10.1.0.9"))) is None
    assert nonzero(x)["drop_no_service"] == 1
    assert_counters_agree(reference, x)


def test_fragments_take_the_lowest_port_service(pair) -> None:
    reference, x = pair
    apply(reference, x, {
        svc("10.1.0.1:443/tcp"): ((B[0],), (1,)),
        svc("10.1.0.1:80/tcp"): ((B[1],), (1,)),
        svc("10.1.0.1:8080/tcp"): ((B[2],), (1,)),
    })
    later = 0x0010  # a later fragment: no ports, the 3-tuple
    assert backend(reference, x, wrap(tcp(1, 2, frag=later))) == B[1]
    assert backend(reference, x, wrap(tcp(1, 2, frag=0x2000))) == B[1]  # the first one (MF) too
    assert backend(reference, x, wrap(udp(1, 2, frag=later))) is None   # no UDP service: NO_SERVICE
    # A port-0 TCP service is then the exact match for fragments, and the lowest port anyway.
    apply(reference, x, {**{k: ((B[i],), (1,)) for i, k in enumerate(reference.services)},
                         svc("10.1.0.1:0/tcp"): ((B[3],), (1,))})
    assert backend(reference, x, wrap(tcp(1, 2, frag=later))) == B[3]
    # An any-protocol service comes before the fallback for a key without ports.
    apply(reference, x, {svc("10.1.0.1:443/tcp"): ((B[0],), (1,)), svc("10.1.0.1"): ((B[4],), (1,))})
    assert backend(reference, x, wrap(tcp(1, 2, frag=later))) == B[4]
    assert backend(reference, x, wrap(udp(1, 2, frag=later))) == B[4]
    # A packet whose ports are really 0 is treated like a fragment (the key is all that is looked at).
    apply(reference, x, {svc("10.1.0.1:443/tcp"): ((B[0],), (1,))})
    assert backend(reference, x, wrap(tcp(0, 0))) == B[0]
    assert backend(reference, x, wrap(tcp(1, 0))) is None
    assert_counters_agree(reference, x)


def test_icmp_errors_find_the_service_of_their_flow(pair) -> None:
    reference, x = pair
    apply(reference, x, {svc("10.1.0.1:80/tcp"): (tuple(B[:3]), (1, 1, 1)), svc("10.1.0.1"): ((B[4],), (1,))})
    for p in range(40000, 40020):
        flow = backend(reference, x, wrap(tcp(p, 80)))
        assert flow in B[:3]
        reply = tcp(80, p, dst=CLIENTS[0], src="10.1.0.1")  # what the backend sent, quoted by a router
        assert backend(reference, x, wrap(icmp_error(reply))) == flow
    # A timestamp request (not an error) is the 3-tuple: the any-protocol service. (An echo request is
    # answered by the balancer: answer_ping's default, tests/test_xdp_program.py.)
    assert backend(reference, x, wrap(ipv4(addr(CLIENTS[0]), addr("10.1.0.1"), 1, b"\x0d" + bytes(19)))) == B[4]
    assert_counters_agree(reference, x)


def test_drain_keeps_flows_and_removal_drops_them(pair) -> None:
    reference, x = pair
    key = svc("10.1.0.1:80/tcp")
    apply(reference, x, {key: (tuple(B[:3]), (1, 1, 1))})
    flows = {p: backend(reference, x, wrap(tcp(p, 80))) for p in range(41000, 41060)}
    drained = flows[41000]
    apply(reference, x, {key: (tuple(B[:3]), tuple(0 if b == drained else 1 for b in B[:3]))})
    for p, b in flows.items():
        assert backend(reference, x, wrap(tcp(p, 80))) == b         # established flows stay
    for p in range(42000, 42060):
        assert backend(reference, x, wrap(tcp(p, 80))) != drained  # new ones go elsewhere
    # Every backend drained: existing flows carry on, new ones have no backend.
    apply(reference, x, {key: (tuple(B[:3]), (0, 0, 0))})
    assert backend(reference, x, wrap(tcp(41001, 80))) == flows[41001]
    assert backend(reference, x, wrap(tcp(43000, 80))) is None
    assert nonzero(x)["drop_no_backend"] == 1
    # Removed: NO_SERVICE, for old flows too; added back: the flows find their backends again.
    apply(reference, x, {})
    assert backend(reference, x, wrap(tcp(41002, 80))) is None
    assert nonzero(x)["drop_no_service"] == 1
    assert x.service_entries() == {}
    apply(reference, x, {key: (tuple(B[:3]), (1, 1, 1))})
    assert backend(reference, x, wrap(tcp(41002, 80))) == flows[41002]
    assert_counters_agree(reference, x)


def test_connection_entries_belong_to_the_flows_service(pair) -> None:
    """A flow's entry is used only if its backend is listed in the service the flow matches now."""
    reference, x = pair
    vip_any = svc("10.1.0.2")
    apply(reference, x, {vip_any: ((B[0], B[1]), (1, 1))})
    flows = {p: backend(reference, x, wrap(tcp(p, 80, dst="10.1.0.2"))) for p in range(44000, 44040)}
    # A more specific service appears: flows on a backend it lists stay, the others move into it.
    http = svc("10.1.0.2:80/tcp")
    apply(reference, x, {vip_any: ((B[0], B[1]), (1, 1)), http: ((B[0], B[2]), (1, 1))})
    moved = 0
    for p, b in flows.items():
        now = backend(reference, x, wrap(tcp(p, 80, dst="10.1.0.2")))
        assert now in (B[0], B[2])
        if b == B[0]:
            assert now == B[0]
        moved += now != b
    assert moved
    # Other protocols still use the any-protocol service.
    assert backend(reference, x, wrap(udp(5, 80, dst="10.1.0.2"))) in (B[0], B[1])
    assert_counters_agree(reference, x)


def stamp(x: XdpProgram) -> m.RrConn:
    """The one connection entry's value: its service stamp (rr_conn.svc_*)."""
    (entry,) = x.connections()
    return m.RrConn.from_buffer_copy(x.lookup(m.conn_map(entry.key), entry.key, ctypes.sizeof(m.RrConn)))


def test_a_flows_cached_service_gives_way_to_a_new_one(pair) -> None:
    """The program's service cache (rr_conn's stamp, rr_config.services_gen): a hit under the current
    generation skips the rr_services lookup; a more specific service added for the flow's port bumps
    the generation, and the flow's next packet goes to the new service."""
    reference, x = pair
    vip_any, http = svc("10.1.0.2"), svc("10.1.0.2:80/tcp")
    apply(reference, x, {vip_any: ((B[0], B[1]), (1, 1))})
    frame = wrap(tcp(45000, 80, dst="10.1.0.2"))
    assert backend(reference, x, frame) in (B[0], B[1])
    assert backend(reference, x, frame) in (B[0], B[1])   # a hit: the entry's stamp named the service
    gen = x.read_config().services_gen
    assert gen and (stamp(x).svc_gen, stamp(x).svc_index) == (gen, x.image.service_index[vip_any])
    apply(reference, x, {vip_any: ((B[0], B[1]), (1, 1)), http: ((B[2],), (1,))})
    assert x.read_config().services_gen > gen
    assert backend(reference, x, frame) == B[2]
    assert (stamp(x).svc_gen, stamp(x).svc_index) == (x.read_config().services_gen, x.image.service_index[http])
    # The same services again (new table objects, same contents): no new generation, the stamp holds.
    gen = x.read_config().services_gen
    apply(reference, x, {vip_any: ((B[0], B[1]), (1, 1)), http: ((B[2],), (1,))})
    assert x.read_config().services_gen == gen and backend(reference, x, frame) == B[2]
    assert_counters_agree(reference, x)


def test_an_expired_entry_that_keeps_its_backend_is_restamped(pair) -> None:
    """An entry past its idle timeout that the table gives the same backend is written in place (no map
    update): it comes out as an update would leave it, stamped with the flow's service and the time."""
    reference, x = pair
    vip_any = svc("10.1.0.2")
    apply(reference, x, {vip_any: ((B[0], B[1]), (1, 1))})
    frame = wrap(tcp(45100, 80, dst="10.1.0.2"))
    chosen = backend(reference, x, frame)
    (entry,) = x.connections()
    stale = time.monotonic_ns() - 301 * 10**9  # past the TCP timeout (300 s); written unstamped (svc_gen 0)
    x.write_connection(entry.key, chosen, stale)
    counters.reset(x)
    assert x.test_run(frame)[0] == XdpAction.TX
    after = stamp(x)
    assert (after.svc_gen, after.svc_index) == (x.read_config().services_gen, x.image.service_index[vip_any])
    assert after.last_seen_ns > stale and x.connection(entry.key).backend == IPv4Address(chosen)
    assert nonzero(x) == {"conn_new": 1, "forwarded": 1}  # rewritten from the table, not a new entry


def test_a_handovers_successor_never_trusts_its_predecessors_stamps() -> None:
    """A successor adopting the connection tables issues generations after every one its predecessor
    did, so the entries it adopts are looked up again (and restamped), and their flows keep their
    backends even when the service indices are allocated differently."""
    reference = Balancer(LB_ADDRESS, LB_MAC)
    old = {svc("10.1.0.2"): ((B[0], B[1]), (1, 1))}
    with XdpProgram(table_size=TABLE_SIZE, conn_capacity=1 << 10, max_services=4) as first:
        apply(reference, first, old)
        flows = {p: backend(reference, first, wrap(tcp(p, 80, dst="10.1.0.2"))) for p in range(46000, 46020)}
        first_gen = first.read_config().services_gen
        with XdpProgram(table_size=TABLE_SIZE, conn_capacity=1 << 10, max_services=4,
                        reuse_conns_fd=first.fds[m.MAP_CONNS]) as second:
            second.adopt(first.fds[m.MAP_BACKENDS])
            # Another service first: the VIP's service gets another index here.
            apply(reference, second, {svc("10.1.0.1:53/udp"): ((B[2],), (1,)), **old})
            assert second.read_config().services_gen > first_gen
            assert second.image.service_index[svc("10.1.0.2")] != first.image.service_index[svc("10.1.0.2")]
            for p, b in flows.items():
                assert backend(reference, second, wrap(tcp(p, 80, dst="10.1.0.2"))) == b
            assert counters.named(second)["conn_hit"] == len(flows)
            gens = {m.RrConn.from_buffer_copy(second.lookup(m.MAP_CONNS, e.key, ctypes.sizeof(m.RrConn))).svc_gen
                    for e in second.connections()}
            assert gens == {second.read_config().services_gen}   # every adopted entry restamped


def test_maps_hold_the_services(pair) -> None:
    reference, x = pair
    apply(reference, x, {svc("10.1.0.1:80/tcp"): ((B[0], B[1]), (1, 1)), svc("10.1.0.1:53/udp"): ((B[1],), (0,))})
    entries = x.service_entries()
    i80, i53 = x.image.service_index[svc("10.1.0.1:80/tcp")], x.image.service_index[svc("10.1.0.1:53/udp")]
    vip = IPv4Address("10.1.0.1").packed
    ping = m.OPT_ANSWER_PING  # the default options: answer_ping only (docs/WIRE.md section 11)
    assert entries == {
        lookup_entry(vip, (80).to_bytes(2, "big"), 6): (i80, TABLE_SIZE, ping),
        lookup_entry(vip, b"\x00\x00", 6, fragment=True): (i80, TABLE_SIZE, ping),
        lookup_entry(vip, (53).to_bytes(2, "big"), 17): (i53, 0, ping),
        lookup_entry(vip, b"\x00\x00", 17, fragment=True): (i53, 0, ping),
    }
    pool = reference.services[svc("10.1.0.1:80/tcp")]
    assert x.read_table(i80, TABLE_SIZE) == [backend_index(x, pool.service.table.backends[s])
                                             for s in pool.service.table.slots]
    cfg = x.read_config()
    assert (cfg.named_services, cfg.catch_all, cfg.table_stride) == (2, 0, TABLE_SIZE)
    assert {backend_index(x, b) for b in (B[0], B[1])} == {0, 1} and x.read_backend(1).in_use


def test_too_many_services_is_refused(pair) -> None:
    reference, x = pair
    apply(reference, x, {svc("10.1.0.1:80/tcp"): ((B[0],), (1,))})
    before = x.image
    with pytest.raises(ValueError, match="max_services"):
        apply(Balancer(LB_ADDRESS, LB_MAC), x, {ServiceKey(IPv4Address(f"10.9.0.{i}")): ((B[0],), (1,))
                                                for i in range(len(CANDIDATES) + 1)})
    assert x.image is before and x.service_entries() == before.services  # nothing was written


def test_catch_all_after_the_services_with_a_vip(pair) -> None:
    """The catch-all takes what no service with a VIP matches, after all of their rules (fragments too)."""
    reference, x = pair
    apply(reference, x, {svc("10.1.0.1:80/tcp"): ((B[0],), (1,)), svc("*"): ((B[1], B[2]), (1, 1))})
    assert backend(reference, x, wrap(tcp(40000, 80))) == B[0]
    assert backend(reference, x, wrap(tcp(1, 2, frag=0x0010))) == B[0]         # the fragment fallback
    assert backend(reference, x, wrap(udp(40000, 80))) in (B[1], B[2])          # no UDP service there
    assert backend(reference, x, wrap(tcp(40000, 80, dst="10.1.0.9"))) in (B[1], B[2])
    cfg = x.read_config()
    assert cfg.named_services == 1 and cfg.catch_all == 1 + x.image.service_index[svc("*")]
    assert cfg.catch_all_size == TABLE_SIZE
    # The catch-all drained: its flows stay, new ones are NO_BACKEND (not NO_SERVICE).
    kept = backend(reference, x, wrap(udp(5, 5)))
    apply(reference, x, {svc("10.1.0.1:80/tcp"): ((B[0],), (1,)), svc("*"): ((B[1], B[2]), (0, 0))})
    assert x.read_config().catch_all_size == 0
    assert backend(reference, x, wrap(udp(5, 5))) == kept
    assert backend(reference, x, wrap(udp(6, 6))) is None and nonzero(x)["drop_no_backend"] == 1
    # Without it: NO_SERVICE again.
    apply(reference, x, {svc("10.1.0.1:80/tcp"): ((B[0],), (1,))})
    assert x.read_config().catch_all == 0
    assert backend(reference, x, wrap(udp(5, 5))) is None and nonzero(x)["drop_no_service"] == 1
    assert_counters_agree(reference, x)


def test_environment_form_after_services(program) -> None:
    """One program, from services with a VIP to the environment form: every VIP balanced, exactly as
    core, and rr_services empty (the catch-all is found without a lookup)."""
    program.clear_connections()
    counters.reset(program)
    services = Balancer(LB_ADDRESS, LB_MAC)
    apply(services, program, {svc("10.1.0.1:80/tcp"): ((B[0],), (1,))})
    assert program.test_run(wrap(udp(1, 53)))[0] == XdpAction.DROP
    program.clear_connections()
    counters.reset(program)
    reference = Balancer(LB_ADDRESS, LB_MAC)
    apply(reference, program, {ServiceKey.catch_all(): (tuple(B[:3]), (1, 1, 1))})
    assert program.read_config().named_services == 0 and program.service_entries() == {}
    for p in range(50):
        assert backend(reference, program, wrap(udp(p, 53, dst=VIPS[p % 4]))) in B[:3]
    assert_counters_agree(reference, program)


# -- the differential --------------------------------------------------------------------------------


def test_xdp_matches_python_in_services_mode(program) -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(scenario())
    def check(case) -> None:
        before, after, unresolved, batch, change_at = case
        program.clear_connections()
        counters.reset(program)
        reference = Balancer(LB_ADDRESS, LB_MAC)
        mirror(program, reference)  # forget the previous example's services
        apply(reference, program, before, unresolved)
        for i, frame in enumerate(batch):
            if i == change_at:
                apply(reference, program, after, unresolved)
            verdict = both(reference, program, frame)
            seen[verdict.action.name if verdict.action != Action.DROP else verdict.reason.name] += 1
        assert_counters_agree(reference, program)

    check()
    assert seen["FORWARD"] > 500 and seen["NO_SERVICE"] > 100 and seen["NO_BACKEND"] > 10, seen
