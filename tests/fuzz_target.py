"""The fuzz target: one input, every parser and both engines, one invariant.

For any bytes: the codecs parse them or raise ParseError (nothing else); Balancer.decide returns a
verdict (it never raises); the AF_PACKET engine's block processor (engines/afpacket/bulk.py, through the
ring walker on an in-memory ring) sends what decide() forwards and counts what it counts; and the XDP
program, run on the same frame with the same tables and the same connection history, gives the same
verdict and the same output bytes. bench/fuzz.py drives this with
atheris (coverage-guided) for a million inputs; tests/test_fuzz_target.py runs a short slice in CI.
"""

from __future__ import annotations

import time

from rusty_rail.core.balancer import Balancer
from rusty_rail.core.conntrack import ConnectionTable, Timeouts
from rusty_rail.core.errors import ParseError
from rusty_rail.core.ethernet import EtherType, mac_to_bytes, parse_ethernet
from rusty_rail.core.gre import GRE_PROTO_IPV4, GRE_PROTO_IPV6, parse_gre
from rusty_rail.core.ipv4 import IpProtocol, parse_ipv4
from rusty_rail.core.ipv6 import parse_extension_headers, parse_ipv6
from rusty_rail.core.verdict import Action
from rusty_rail.engines.afpacket.bulk import BulkProcessor
from rusty_rail.engines.afpacket.walker import RingWalker
from rusty_rail.core.maglev import build_table
from rusty_rail.core.options import IcmpLimit
from rusty_rail.core.service import Service
from tests.fixtures.golden import (
    ALL_BACKENDS,
    LB_ADDRESS,
    LB_ADDRESS6,
    LB_MAC,
    MTU,
    SMALL,
    SMALL6,
    SMALL_MTU,
    fixtures,
    golden_services,
)
from tests.memory_ring import MemoryRing

# Long timeouts: the two engines keep time differently (the caller's clock, the kernel's tick), and a
# fuzz run must not see an entry expire in one and not in the other.
_TIMEOUTS = Timeouts(tcp=86400.0, udp=86400.0, other=86400.0)
TABLE_SIZE = 251
_UNLIMITED = IcmpLimit(per_second=1_000_000_000, burst=1_000_000)
"""Too big" answers: the engines' token buckets keep time differently too (see above); with a millisecond
of credit at a nanosecond an answer neither ever runs dry, so a fuzz run compares the answers themselves.
tests/test_xdp_program.py tests the bucket."""


def seeds() -> list[bytes]:
    return [fx.frame for fx in fixtures()]


def parse_chain(data: bytes) -> None:
    """Ethernet -> IPv4 or IPv6 -> GRE -> IPv4 or IPv6 (and its extension headers) with the codecs; only
    ParseError may come out."""
    try:
        eth, payload = parse_ethernet(data)
        if eth.ethertype == EtherType.IPV4:
            outer, gre_packet = parse_ipv4(payload)
            if outer.protocol != IpProtocol.GRE:
                return
        elif eth.ethertype == EtherType.IPV6:
            outer6, gre_packet = parse_ipv6(payload)
            if outer6.next_header != IpProtocol.GRE:
                return
        else:
            return
        gre, inner = parse_gre(gre_packet)
        if gre.protocol == GRE_PROTO_IPV4:
            parse_ipv4(inner, verify_checksum=False)
        elif gre.protocol == GRE_PROTO_IPV6:
            header, body = parse_ipv6(inner)
            parse_extension_headers(header.next_header, body)
    except ParseError:
        pass


class Target:
    """Both engines with equal state; `check(data)` raises AssertionError on any disagreement."""

    def __init__(self, with_xdp: bool = True) -> None:
        self.balancer = self._balancer()
        self.bulk_balancer = self._balancer()
        self.ring = MemoryRing(rx_blocks=2, tx_frames=16)
        self.walker = RingWalker(self.ring, BulkProcessor(self.bulk_balancer, bulk_from=1))  # arrays for one frame too
        self.xdp = None
        if with_xdp:
            from rusty_rail.engines.xdp import XdpProgram
            from tests.xdp_support import mirror

            self.xdp = XdpProgram(table_size=TABLE_SIZE, conn_capacity=1 << 16, max_services=len(golden_services()))
            mirror(self.xdp, self.balancer)
        self.inputs = 0

    @staticmethod
    def _balancer() -> Balancer:
        """The golden fixtures' services (tests/fixtures/golden.py) with their options and the narrow routes
        toward SMALL and SMALL6, with small tables."""
        services = [Service(s.key, build_table(list(s.table.backends), TABLE_SIZE), s.options) for s in golden_services()]
        balancer = Balancer(LB_ADDRESS, mac_to_bytes(LB_MAC), services, local_address6=LB_ADDRESS6, mtu=MTU,
                            connections=ConnectionTable(capacity=1 << 16, timeouts=_TIMEOUTS), icmp_limit=_UNLIMITED)
        for backend, mac in ALL_BACKENDS.items():
            balancer.set_neighbour(backend, mac_to_bytes(mac), SMALL_MTU if backend in {**SMALL, **SMALL6} else None)
        return balancer

    def check(self, data: bytes) -> None:
        from rusty_rail.engines.xdp import XdpAction

        self.inputs += 1
        parse_chain(data)
        now = time.monotonic()
        verdict = self.balancer.decide(data, now)
        assert verdict.action in (Action.FORWARD, Action.REPLY, Action.PASS, Action.DROP)
        sends = verdict.action in (Action.FORWARD, Action.REPLY)
        self.ring.fill([data])
        self.walker.step(now)
        sent = self.ring.take_sent()
        assert sent == ([verdict.frame] if sends else []), f"bulk sent {sent} for {data.hex()}"
        if self.inputs % 64 == 0:  # counters are cumulative: a difference shows at the next look
            self.check_counters()
        if self.xdp is None or len(data) < 14:  # the kernel refuses test runs of less than a header
            return
        action, output = self.xdp.test_run(data)
        expected = {Action.FORWARD: XdpAction.TX, Action.REPLY: XdpAction.TX, Action.PASS: XdpAction.PASS,
                    Action.DROP: XdpAction.DROP}
        assert action == expected[verdict.action], f"python {verdict} xdp {action} for {data.hex()}"
        if sends:
            assert output == verdict.frame, f"bytes differ for {data.hex()}"

    def check_counters(self) -> None:
        """The block processor counted what decide() counted, every figure."""
        assert self.bulk_balancer.counters() == self.balancer.counters()
        assert self.bulk_balancer.backend_figures() == self.balancer.backend_figures()

    def close(self) -> None:
        self.ring.close()
        if self.xdp is not None:
            self.xdp.close()
