"""engines/afpacket/cbpf.py: the socket filter and the inner-flow fanout program, run on frames by a
classic BPF interpreter (tests/cbpf_vm.py); tests/test_engine_ring.py shows the kernel accepts them."""

from __future__ import annotations

from collections import Counter

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP, GRE, Ether
from scapy.packet import Raw

from rusty_rail.engines.afpacket import cbpf
from tests.cbpf_vm import program, run
from tests.fixtures.golden import outer, outer6, wrapped, wrapped6

FILTER = program(cbpf.gre_only_filter())
FANOUT = program(cbpf.inner_flow_fanout_program())


def test_filter_keeps_gre_over_either_family_only() -> None:
    inner = IP(src="10.0.0.1", dst="10.1.0.1") / TCP()
    assert run(FILTER, wrapped(inner)) and run(FILTER, wrapped6(inner))
    assert run(FILTER, wrapped6(IPv6(src="2001:db8:c::1", dst="2001:db8:1::1") / UDP()))
    host = Ether()
    for frame in (host / ARP(), host / IP() / TCP(), host / IPv6() / ICMPv6ND_NS(),
                  outer6(IPv6ExtHdrDestOpt(nh=47) / GRE() / inner, nh=60)):
        assert run(FILTER, bytes(frame)) == 0, frame.summary()
    assert run(FILTER, wrapped(inner), vlan_tagged=True) == 0


def test_every_packet_of_a_flow_goes_to_one_worker() -> None:
    v4 = [IP(src="10.0.0.7", dst="10.1.0.1") / TCP(sport=p, dport=80) for p in (1, 2)]
    v4.append(IP(src="10.0.0.7", dst="10.1.0.1", frag=10, proto=6) / Raw(b"x" * 8))
    values = {run(FANOUT, f) for inner in v4 for f in (wrapped(inner), wrapped6(inner), wrapped(inner, key_present=1, key=9),
                                                       wrapped6(inner, chksum_present=1, seqnum_present=1))}
    assert len(values) == 1 and values != {0}
    c6, vip6 = "2001:db8:c::7", "2001:db8:1::1"
    v6 = [IPv6(src=c6, dst=vip6) / TCP(sport=p, dport=443) for p in (1, 2)]
    v6.append(IPv6(src=c6, dst=vip6) / IPv6ExtHdrFragment(offset=9, nh=6) / Raw(b"y" * 8))
    values6 = {run(FANOUT, f) for inner in v6 for f in (wrapped(inner), wrapped6(inner, key_present=1, key=3))}
    assert len(values6) == 1 and values6 != {0}


def test_flows_spread_over_workers_and_what_is_not_balanced_goes_to_worker_0() -> None:
    inner_at = 14 + 40 + 4  # GRE over IPv6, no options
    for family, inner, src_at in (("v4", IP(src="10.0.0.0", dst="10.1.0.1") / UDP(), 12),
                                  ("v6", IPv6(src="2001:db8:c::", dst="2001:db8:1::1") / UDP(), 8)):
        template = wrapped6(inner)
        size = 4 if family == "v4" else 16
        base = int.from_bytes(template[inner_at + src_at : inner_at + src_at + size], "big")
        # One scapy frame, its source patched per client: building 300 with scapy would take seconds.
        values = [run(FANOUT, template[:inner_at + src_at] + (base + i).to_bytes(size, "big")
                      + template[inner_at + src_at + size:]) for i in range(1, 301)]
        for workers in (2, 3):
            spread = Counter(v % workers for v in values)
            assert min(spread.values()) > 300 / workers * 0.75, (family, workers, spread)
    assert run(FANOUT, bytes(Ether() / IP() / TCP())) == 0
    assert run(FANOUT, bytes(outer(GRE() / IP() / TCP(), flags="MF"))) == 0
    assert run(FANOUT, bytes(outer6(IPv6ExtHdrDestOpt(nh=47) / GRE() / IP() / TCP(), nh=60))) == 0
