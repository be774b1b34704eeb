"""The bulk block processor against Balancer.decide, frame for frame: outputs to the byte, in order, and
every counter (forwarded, passed, drops per reason, packets and bytes per (service, backend), the
connection table's entries in LRU order, evictions, expirations).

Both run through the ring walker on an in-memory ring (tests/memory_ring.py), the bulk one on one
balancer (taking the array path for blocks of any size: bulk_from=1) and decide_blocks on a twin; the
golden table and randomised blocks are fed to both.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from ipaddress import IPv6Address

import numpy as np
import pytest

from rusty_rail.core.balancer import Balancer
from rusty_rail.core.conntrack import ConnectionTable, Timeouts
from rusty_rail.core.ethernet import mac_to_bytes
from rusty_rail.core.service import Service, ServiceKey, ServiceProtocol
from rusty_rail.core.verdict import Action
from rusty_rail.dataplane import DataplaneState
from rusty_rail.engines.afpacket.bulk import BULK_FROM, BulkProcessor, common_case, ip_checksums
from rusty_rail.engines.afpacket.walker import RECTANGLE_MAX, RingWalker, decide_blocks
from tests.afpacket_netns import EngineProcess
from tests.engine_netns import VethPair, checksum, drain, ipv4
from tests.fixtures.golden import LB_ADDRESS, LB_ADDRESS6, LB_MAC, TABLE_SIZE, fixtures, golden_balancer, golden_services
from tests.frames6 import fragment_header, ipv6, options_header
from tests.memory_ring import MemoryRing
from tests.services import service
from tests.test_golden_rings import golden_lb, gre_from_lb

ROUTER_MAC, ROUTER, ROUTER6 = bytes.fromhex("020000000001"), "192.168.137.1", "2001:db8:137::1"
POOL = ["10.2.0.1", "10.2.0.2", "10.2.0.3", "10.2.0.4"]
POOL6 = ["2001:db8:2::1", "2001:db8:2::2"]
VIP_WEB, VIP_DNS, VIP_DRAINED, VIP_NONE = "10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.9"
VIP_MIXED = "10.1.0.4"  # an IPv4 VIP whose pool has an IPv6 backend: decided frame by frame
VIP6, VIP6_NONE = "2001:db8:1::1", "2001:db8:1::9"
MTU = 1400  # an IPv4 input near it, sent to an IPv6 backend, is OUTPUT_TOO_BIG


class Twin:
    """One configuration run two ways: the bulk processor and decide() per frame, each on its own
    balancer and ring."""

    def __init__(self, make: Callable[[], Balancer]) -> None:
        self.bulk_balancer, self.frame_balancer = make(), make()
        self.bulk = BulkProcessor(self.bulk_balancer, bulk_from=1)
        self.sides = [(self.bulk_balancer, self.bulk), (self.frame_balancer, decide_blocks(self.frame_balancer))]
        self.rings = [MemoryRing(tx_frames=64) for _ in self.sides]
        self.walkers = [RingWalker(r, p) for r, (_, p) in zip(self.rings, self.sides)]
        self.steps_blocks = 0

    def run(self, frames: list[bytes], now: float, blocks: int = 1) -> tuple[list[bytes], list[bytes]]:
        """`frames` through each, in `blocks` RX blocks taken in one step; what each sent."""
        cut = [len(frames) * i // blocks for i in range(blocks + 1)]
        sent = []
        for ring, walker in zip(self.rings, self.walkers):
            for i in range(blocks):
                ring.fill(frames[cut[i] : cut[i + 1]])
            assert walker.step(now) == len(frames)
            assert walker.stats.rx_blocks == (self.steps_blocks + blocks)
            sent.append(ring.take_sent())
        self.steps_blocks += blocks
        return sent[0], sent[1]

    def assert_same_state(self) -> None:
        a, b = self.bulk_balancer, self.frame_balancer
        assert a.counters() == b.counters()
        assert a.backend_figures() == b.backend_figures()
        assert list(a.connections._entries.items()) == list(b.connections._entries.items())
        assert a.connections.expirations == b.connections.expirations

    def close(self) -> None:
        for ring in self.rings:
            ring.close()


@pytest.fixture
def golden_twin() -> Iterable[Twin]:
    twin = Twin(golden_balancer)
    yield twin
    twin.close()


def test_every_golden_fixture_alone(golden_twin: Twin) -> None:
    for fx in fixtures():
        bulk, per_frame = golden_twin.run([fx.frame], now=1.0)
        assert bulk == per_frame, fx.description
        assert bulk == ([fx.output] if fx.action in (Action.FORWARD, Action.REPLY) else []), fx.description
        golden_twin.assert_same_state()
    assert golden_twin.bulk.bulk_frames > 0, "the common-case fixtures took the array path"


def test_the_golden_table_as_one_block_in_order(golden_twin: Twin) -> None:
    frames = [fx.frame for fx in fixtures()]
    bulk, per_frame = golden_twin.run(frames * 3, now=1.0)
    want = [fx.output for fx in fixtures() if fx.action in (Action.FORWARD, Action.REPLY)] * 3
    assert bulk == per_frame == want
    golden_twin.assert_same_state()


def tcp(sport: int, dport: int, flags: int = 0x10, payload: bytes = b"") -> bytes:
    return sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(8) + bytes((0x50, flags)) + bytes(6) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload


def outer(inner: bytes, gre: bytes = b"\x00\x00\x08\x00", tail: bytes = b"") -> bytes:
    return LB_MAC_BYTES + ROUTER_MAC + b"\x08\x00" + ipv4(ROUTER, LB_ADDRESS, 47, gre + inner) + tail


LB_MAC_BYTES = mac_to_bytes(LB_MAC)


def outer6(inner: bytes, gre: bytes = b"\x00\x00\x86\xdd", tail: bytes = b"") -> bytes:
    """GRE over IPv6 (next header 47 directly after the fixed header)."""
    return (LB_MAC_BYTES + ROUTER_MAC + b"\x86\xdd"
            + ipv6(int(IPv6Address(ROUTER6)), int(IPv6Address(LB_ADDRESS6)), 47, gre + inner) + tail)


def random_frame6(rng: random.Random, flows6: list[tuple[str, str, int, int, int]], l4: bytes, v4_inner: bytes) -> bytes:
    """The IPv6 kinds, none of them the array path's: either outer family carrying either inner family,
    extension headers, fragments, ICMPv6, neighbour discovery for the host, a malformed inner header."""
    src, vip, proto, sport, dport = rng.choice(flows6)
    s, d = int(IPv6Address(src)), int(IPv6Address(vip))
    l4 = (tcp(sport, dport, payload=l4[20:]) if proto == 6 else udp(sport, dport, l4[8:]))
    inner6 = ipv6(s, d, proto, l4, tc=rng.choice([0, 0xB8]), label=rng.randrange(1 << 20))
    kind = rng.random()
    if kind < 0.3:
        return outer(inner6, gre=b"\x00\x00\x86\xdd")  # inner IPv6 in IPv4
    if kind < 0.5:
        return outer6(inner6, tail=bytes(rng.choice([0, 0, 4])))  # IPv6 in IPv6
    if kind < 0.65:
        return outer6(v4_inner, gre=b"\x00\x00\x08\x00")  # the common case's inner IPv4, over IPv6
    if kind < 0.72:
        return outer(ipv6(s, d, 0, options_header(60, 0) + options_header(proto, 1) + l4), gre=b"\x00\x00\x86\xdd")
    if kind < 0.78:
        more = rng.random() < 0.5
        return outer6(ipv6(s, d, 44, fragment_header(proto, 0 if more else rng.randrange(1, 100), more, 7) + l4))
    if kind < 0.82:
        five = b"".join(options_header(60, 0) for _ in range(4)) + options_header(proto, 0)
        return outer6(ipv6(s, d, 60, five + l4))  # a fifth extension header: INNER_EXT_HEADERS
    if kind < 0.86:
        return outer6(ipv6(s, d, 58, bytes((128, 0, 0, 0, 0, 1, 0, 1))))  # ICMPv6 echo inside GRE
    if kind < 0.90:  # neighbour solicitation to the host: not GRE, passed
        return LB_MAC_BYTES + ROUTER_MAC + b"\x86\xdd" + ipv6(int(IPv6Address(ROUTER6)), int(IPv6Address(LB_ADDRESS6)), 58, bytes((135, 0)) + bytes(22))
    if kind < 0.94:
        return outer6(inner6[:30])  # inner IPv6 cut short
    return outer(ipv6(s, d, proto, l4 + bytes(1400)), gre=b"\x00\x00\x86\xdd")  # too big for an IPv6 backend: ok in IPv4


def random_frame(rng: random.Random, flows: list[tuple[str, str, int, int, int]],
                 flows6: list[tuple[str, str, int, int, int]] | None = None) -> bytes:
    """Mostly the common case over a few repeated flows; the rest, every kind decide() must handle
    (with `flows6`, IPv6 among them: a fifth of the frames)."""
    src, vip, proto, sport, dport = rng.choice(flows)
    body = bytes(rng.randrange(0, 40)) if rng.random() < 0.9 else bytes(rng.randrange(300, 1300))
    l4 = tcp(sport, dport, payload=body) if proto == 6 else udp(sport, dport, body)
    inner = bytearray(ipv4(src, vip, proto, l4, ident=rng.randrange(65536)))
    inner[1] = rng.choice([0, 0, 0xB8, 0x10])  # TOS: copied to the outer header
    if flows6 and rng.random() < 0.2:
        return random_frame6(rng, flows6, l4, bytes(inner))
    kind = rng.random()
    if kind < 0.75:
        return outer(bytes(inner), tail=bytes(rng.choice([0, 0, 6])))  # Ethernet padding: ignored
    if kind < 0.78:
        return outer(bytes(inner) + b"JUNK")  # bytes after the inner total length: trimmed
    if kind < 0.81:
        inner[6] = 0x20  # MF: a fragment, 3-tuple
        return outer(bytes(inner))
    if kind < 0.83:
        return outer(ipv4(src, vip, 1, bytes((8, 0, 0, 0, 0, 7, 0, 1))))  # ICMP echo
    if kind < 0.85:
        return outer(bytes(inner), gre=b"\x20\x00\x08\x00" + bytes(4))  # GRE key
    if kind < 0.87:
        frame = bytearray(outer(bytes(inner)))
        frame[24] ^= 0x5A  # outer checksum wrong
        return bytes(frame)
    if kind < 0.89:
        return outer(bytes(inner), gre=b"\x00\x00\x86\xdd")  # GRE protocol
    if kind < 0.91:
        return outer(ipv4(src, vip, proto, b"\x01\x02"))  # TCP/UDP without its ports
    if kind < 0.93:
        return LB_MAC_BYTES + ROUTER_MAC + b"\x08\x00" + ipv4(ROUTER, LB_ADDRESS, 17, udp(1, 2))  # not GRE: passed
    if kind < 0.95:
        with_options = bytes((0x46,)) + bytes(inner[1:2]) + (len(inner) + 4).to_bytes(2, "big") + bytes(inner[4:20]) + b"\x01\x01\x01\x00" + bytes(inner[20:])
        return outer(with_options)  # inner options: ports at IHL*4
    if kind < 0.97:
        zero = udp(0, 0, body) if proto == 17 else tcp(0, 0, payload=body)
        return outer(ipv4(src, vip, proto, zero))  # ports both 0: the fragment rule of the matcher
    frame = bytearray(outer(bytes(inner)))
    frame[21] = 0x01  # outer fragment offset
    frame[24:26] = b"\0\0"
    frame[24:26] = checksum(bytes(frame[14:34])).to_bytes(2, "big")
    return bytes(frame)


def services(table_size: int = 251, without: str | None = None) -> list[Service]:
    pool = [b for b in POOL if b != without]
    return [
        service(ServiceKey.parse(f"{VIP_WEB}:80"), pool, table_size),
        service(ServiceKey.parse(f"{VIP_WEB}:443"), pool[:2], table_size),
        service(ServiceKey.parse(f"{VIP_DNS}:53/udp"), pool[1:], table_size),
        service(ServiceKey(ServiceKey.parse(VIP_DNS).vip, ServiceProtocol.TCP), pool[:3], table_size),
        service(ServiceKey.parse(f"{VIP_DRAINED}:80"), pool[:2], table_size, {pool[0]: 0, pool[1]: 0}),
        service(ServiceKey.parse(f"{VIP_MIXED}:80"), [pool[-1], POOL6[0]], table_size),
        service(ServiceKey.parse(f"[{VIP6}]:443"), [*POOL6, pool[0]], table_size),
        service(ServiceKey(ServiceKey.parse(VIP6).vip, ServiceProtocol.UDP), POOL6, table_size),
    ]


def random_balancer(capacity: int) -> Balancer:
    connections = ConnectionTable(capacity, Timeouts(tcp=5, udp=2, other=1))
    balancer = Balancer(LB_ADDRESS, LB_MAC_BYTES, services(), connections, local_address6=LB_ADDRESS6, mtu=MTU)
    for i, backend in enumerate(POOL[:-1] + POOL6):  # the last IPv4 backend's next hop stays unknown: NO_NEIGHBOUR
        balancer.set_neighbour(backend, bytes((2, 0, 0, 0, 2, i)))
    return balancer


@pytest.mark.parametrize("seed", range(6))
def test_random_blocks_give_what_decide_gives(seed: int) -> None:
    """Mixed good and bad frames over repeated flows, a table small enough to evict, time passing past
    the timeouts, a backend leaving half-way (entries naming it are rewritten), and several retired
    blocks taken together; IPv6 frames of every kind among them (never the array path's), and an IPv4
    service whose pool has an IPv6 backend."""
    rng = random.Random(seed)
    served = [(VIP_WEB, 6, 80), (VIP_WEB, 6, 443), (VIP_DNS, 17, 53), (VIP_DNS, 6, 8080), (VIP_DRAINED, 6, 80),
              (VIP_MIXED, 6, 80)]
    unserved = [(VIP_WEB, 17, 80), (VIP_NONE, 6, 80)]
    flows = [(f"10.0.{rng.randrange(4)}.{rng.randrange(1, 250)}", vip, proto, rng.randrange(1024, 65536), port)
             for vip, proto, port in (rng.choice(served if rng.random() < 0.9 else unserved) for _ in range(60))]
    served6, unserved6 = [(VIP6, 6, 443), (VIP6, 17, 53)], [(VIP6, 6, 80), (VIP6_NONE, 6, 443)]
    flows6 = [(f"2001:db8:c::{rng.randrange(1, 0xFFFF):x}", vip, proto, rng.randrange(1024, 65536), port)
              for vip, proto, port in (rng.choice(served6 if rng.random() < 0.9 else unserved6) for _ in range(30))]
    capacity = rng.choice([8, 40, 1000])
    twin = Twin(lambda: random_balancer(capacity))
    try:
        now = 0.0
        for block in range(40):
            if block == 20:
                for balancer, _ in twin.sides:
                    balancer.set_services(services(without=POOL[0]))
            frames = [random_frame(rng, flows, flows6) for _ in range(rng.randrange(3, 120))]
            bulk, per_frame = twin.run(frames, now, blocks=rng.choice([1, 1, 2, 3]))
            assert bulk == per_frame, f"block {block}"
            twin.assert_same_state()
            now += rng.choice([0.0, 0.1, 0.5, 1.5, 3.0])
        counters = twin.bulk_balancer.counters()
        assert twin.bulk.bulk_frames > 0 and counters["connection_evictions"] + counters["drop_no_neighbour"] > 0
        assert counters["forwarded_ipv6"] > 0 and twin.bulk_balancer.connections.ipv6 > 0, counters
    finally:
        twin.close()


def test_a_block_of_full_sized_segments_gives_what_decide_gives() -> None:
    """Bulk TCP (nearly every segment full-sized, a few short): its payloads are copied into the TX ring
    as one rectangle (walker.RECTANGLE_PADDING), and every byte is still decide()'s."""
    twin = Twin(lambda: random_balancer(1000))
    widths: list[int] = []
    ring = twin.rings[0]
    window = ring.window
    ring.window = lambda width: widths.append(width) or window(width)  # type: ignore[method-assign]
    try:
        frames = [outer(ipv4(f"10.0.0.{i % 7 + 1}", VIP_WEB, 6, tcp(40000 + i % 7, 80, payload=bytes([i]) * (20 if i % 9 == 0 else 1300))))
                  for i in range(60)]
        bulk, per_frame = twin.run(frames, 0.0)
        assert bulk == per_frame and len(bulk) > 30 and twin.bulk.bulk_frames == len(frames)
        assert max(widths) > RECTANGLE_MAX, "the payloads went as one rectangle"
        twin.assert_same_state()
    finally:
        twin.close()


def test_ipv6_frames_and_pools_with_ipv6_backends_are_decided_frame_by_frame() -> None:
    """The array path is IPv4 over IPv4 to IPv4 backends only: a block of GRE over IPv6, inner IPv6, and
    inner IPv4 to a pool with an IPv6 backend takes none of it, and gives what decide() gives."""
    twin = Twin(lambda: random_balancer(1000))
    try:
        rng = random.Random(5)
        v4 = [ipv4("10.0.0.1", VIP_WEB, 6, tcp(1000 + i, 80)) for i in range(20)]
        flows6 = [("2001:db8:c::1", VIP6, 6, 40000 + i, 443) for i in range(20)]
        frames = ([outer6(p, gre=b"\x00\x00\x08\x00") for p in v4]
                  + [random_frame6(rng, flows6, tcp(1, 2), v4[0]) for _ in range(60)]
                  + [outer(ipv4("10.0.0.1", VIP_MIXED, 6, tcp(2000 + i, 80))) for i in range(20)])
        bulk, per_frame = twin.run(frames, now=1.0)
        assert bulk == per_frame and len(bulk) > 60
        twin.assert_same_state()
        assert twin.bulk.bulk_frames == 0 and twin.bulk_balancer.counters()["forwarded_ipv6"] > 0
        bulk, per_frame = twin.run([outer(p) for p in v4], now=1.0)  # IPv4 all the way: the arrays
        assert bulk == per_frame and twin.bulk.bulk_frames == len(v4)
    finally:
        twin.close()


def test_forwards_keep_their_order_around_frames_decided_one_by_one() -> None:
    """A flow's packets alternate between the array path and decide() (an ICMP error about it, a GRE
    key): they leave in the order they came."""
    twin = Twin(golden_balancer)
    try:
        inner = [ipv4("10.0.0.1", VIP_WEB, 6, tcp(40000, 80, payload=bytes([i]))) for i in range(6)]
        frames = [outer(p, gre=b"\x20\x00\x08\x00" + bytes(4)) if i % 2 else outer(p) for i, p in enumerate(inner)]
        bulk, per_frame = twin.run(frames, now=1.0)
        assert bulk == per_frame and [f[38:] for f in bulk] == inner
    finally:
        twin.close()


def test_common_case_checks_against_decide_column_by_column() -> None:
    """Random single-byte changes to a common-case frame's first 62 bytes: whatever the mask calls
    common, decide() forwards (so no frame decide() would pass or drop takes the array path)."""
    balancer = golden_balancer()
    base = outer(ipv4("10.0.0.1", VIP_WEB, 17, udp(5353, 53, b"q")))
    rng = random.Random(3)
    frames = [base]
    for _ in range(3000):
        frame = bytearray(base)
        frame[rng.randrange(12, 62)] = rng.randrange(256)
        frames.append(bytes(frame))
    h = np.array([list(f[:64]) for f in frames], dtype=np.uint8)
    mask = common_case(h, np.array([len(f) for f in frames]))
    for frame, common in zip(frames, mask.tolist()):
        if common:
            verdict = balancer.decide(frame, 1.0)
            assert verdict.action == Action.FORWARD, frame.hex()
    assert mask[0] and 0 < mask.sum() < len(frames)


def test_ip_checksums_are_rfc_1071() -> None:
    rng = np.random.default_rng(1)
    headers = rng.integers(0, 256, size=(500, 20), dtype=np.uint8)
    headers[:, 10:12] = 0
    want = [checksum(row.tobytes()) for row in headers]
    assert ip_checksums(headers).tolist() == want


def test_a_forward_whose_slot_is_busy_is_spilled_after_what_was_queued() -> None:
    """TX slots the kernel still holds: the frames before them go into the ring and are kicked, the one
    that meets a busy slot is spilled, and nothing is sent out of order."""
    balancer = golden_balancer()
    ring = MemoryRing(tx_frames=8)
    spill_sent: list[bytes] = []

    class Spill:
        def send(self, frame: bytes, flags: int = 0) -> int:
            spill_sent.append((len(ring.sent), frame))  # type: ignore[arg-type]
            return len(frame)

    walker = RingWalker(ring, BulkProcessor(balancer, bulk_from=1), Spill())  # type: ignore[arg-type]
    try:
        # Slot 2 is still SENDING from an earlier kick: the kernel's index is past it.
        ring.u32[(ring.tx_base + 2 * ring.tx_frame_size + 20) >> 2] = 2
        frames = [outer(ipv4("10.0.0.1", VIP_WEB, 17, udp(1000 + i, 53, b"x"))) for i in range(3)]
        ring.fill(frames)
        walker.step(1.0)
        assert walker.stats.tx_spilled == 1 and walker.stats.tx_ring == 2
        assert spill_sent[0][0] == 2, "the spill came after the two frames queued before it were sent"
    finally:
        ring.close()


def test_ports_both_zero_and_destination_port_zero_are_told_apart() -> None:
    """The service rule reads the source port only when both are zero (rule 4: the VIP and protocol's
    lowest port); the array path asks the rule once per distinct destination, so it must not lump them."""
    twin = Twin(lambda: random_balancer(1000))
    try:
        frames = [outer(ipv4("10.0.0.1", VIP_WEB, 6, tcp(0, 0))), outer(ipv4("10.0.0.1", VIP_WEB, 6, tcp(1234, 0)))] * 2
        bulk, per_frame = twin.run(frames, now=1.0)
        assert bulk == per_frame and len(bulk) == 2
        twin.assert_same_state()
        assert twin.bulk_balancer.counters()["drop_no_service"] == 2
    finally:
        twin.close()


def test_vips_that_differ_only_in_their_top_bits_are_told_apart() -> None:
    high, low = "200.1.0.1", "72.1.0.1"  # 0b11001000 and 0b01001000: one bit apart, the top one
    make = lambda: Balancer(LB_ADDRESS, LB_MAC_BYTES, [service(ServiceKey.parse(f"{high}:80"), POOL[:2])])  # noqa: E731
    twin = Twin(make)
    try:
        for balancer, _ in twin.sides:
            balancer.set_neighbour(POOL[0], bytes(6))
            balancer.set_neighbour(POOL[1], bytes(6))
        frames = [outer(ipv4("10.0.0.1", vip, 6, tcp(1000 + i, 80))) for i, vip in enumerate([high, low] * 3)]
        bulk, per_frame = twin.run(frames, now=1.0)
        assert bulk == per_frame and len(bulk) == 3
        twin.assert_same_state()
    finally:
        twin.close()


def test_calls_of_few_frames_go_frame_by_frame() -> None:
    """Below bulk_from frames a call costs less through decide(): the arrays are not used, and the
    result is the same."""
    balancer = golden_balancer()
    processor = BulkProcessor(balancer, bulk_from=BULK_FROM)
    ring = MemoryRing()
    walker = RingWalker(ring, processor)
    try:
        frames = [outer(ipv4("10.0.0.1", VIP_WEB, 17, udp(1000 + i, 53, b"x"))) for i in range(BULK_FROM)]
        ring.fill(frames[:-1])
        walker.step(1.0)
        assert processor.bulk_frames == 0 and len(ring.take_sent()) == BULK_FROM - 1
        ring.fill(frames)
        walker.step(1.0)
        assert processor.bulk_frames == BULK_FROM and len(ring.take_sent()) == BULK_FROM
    finally:
        ring.close()


@pytest.mark.netns
def test_a_burst_through_the_engine_as_shipped_leaves_in_order(veth: VethPair) -> None:
    """Real rings on a veth pair, the engine's own processor: a burst of a few hundred frames (the
    common case over repeated flows, with frames decide() takes between them) gathers in one block,
    takes the array path, and every forward reaches the peer exactly as decide() builds it, in order."""
    golden_lb(veth)
    cap = veth.peer_packet_socket()
    rng = random.Random(9)
    frames = []
    for i in range(300):
        inner = ipv4(f"10.0.0.{rng.randrange(1, 40)}", VIP_WEB, 17, udp(1000 + rng.randrange(20), 53, bytes([i % 256])))
        frames.append(outer(inner, gre=b"\x20\x00\x08\x00" + bytes(4)) if i % 50 == 7 else outer(inner))
    reference = golden_balancer()
    want = [v.frame for f in frames if (v := reference.decide(f, 1.0)).action == Action.FORWARD]
    # Blocks retire after 200 ms here rather than 2: the burst lands in one block whatever the sender's pace.
    with EngineProcess(veth, DataplaneState(golden_services(), TABLE_SIZE), ring_options={"rx_block_tov_ms": 200}) as engine:
        for frame in frames:
            cap.send(frame)
        got = drain(cap, gre_from_lb, len(want))
        report = engine.stop()
    cap.close()
    assert got == want
    counters = report.counters
    assert counters.forwarded == reference.forwarded == len(want)
    assert report.counters.engine["bulk_frames"] >= 300 - 6, "the burst took the array path"
