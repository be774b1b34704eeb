"""The benchmarks' GRE frames as trafgen configurations (trafgen, Debian netsniff-ng), and running it.

TRAFFIC names each kind: the inner packet's family in GRE over the outer family; the balancer's backends
are of the outer family, so what it sends back has the same layout. Every frame: Ethernet | outer IP |
GRE (no options) | inner IP | UDP | 18 bytes; the inner source address's last bytes and the UDP source
port are trafgen drnd() fields (a new flow per packet, almost surely), or fixed (--flows single).
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import time
from collections.abc import Sequence

from tests.engine_netns import VethPair, checksum

TRAFFIC = {"ipv4": ("ipv4", "ipv4"), "ipv6": ("ipv6", "ipv6"), "ipv6-in-ipv4": ("ipv6", "ipv4")}
"""name -> (inner family, outer family): IPv4 in IPv4 (84-byte frames), IPv6 in IPv6 (124), IPv6 in IPv4 (104)."""
VIP, VIP6 = "10.1.0.1", "2001:db8:1::1"
CLIENTS6 = "2001:db8:c::"  # the inner IPv6 sources: this /96 and 4 random bytes
PAYLOAD = 18


def _hx(data: bytes) -> str:
    return ", ".join(f"0x{x:02x}" for x in data)


def frame_bytes(traffic: str) -> int:
    inner, outer = TRAFFIC[traffic]
    return 14 + (20 if outer == "ipv4" else 40) + 4 + (20 if inner == "ipv4" else 40) + 8 + PAYLOAD


def trafgen_config(v: VethPair, flows: str, sender_mac: bytes, traffic: str = "ipv4") -> str:
    """The frame as a trafgen config: fixed Ethernet + outer header + GRE; inner source and port random.
    Outer IPv6 needs v.add_ipv6() first (its addresses are the outer ones). Inner checksums are left 0:
    WIRE.md says they are not checked."""
    inner_family, outer_family = TRAFFIC[traffic]
    inner_len = (20 if inner_family == "ipv4" else 40) + 8 + PAYLOAD
    gre = b"\x00\x00" + (b"\x08\x00" if inner_family == "ipv4" else b"\x86\xdd")
    if outer_family == "ipv4":
        outer = bytearray(bytes([0x45, 0]) + (20 + 4 + inner_len).to_bytes(2, "big") + b"\0\0\x40\x00" + bytes([64, 47])
                          + b"\0\0" + ipaddress.IPv4Address(v.peer_ip).packed + ipaddress.IPv4Address(v.lb_ip).packed)
        outer[10:12] = checksum(bytes(outer)).to_bytes(2, "big")
        fixed = v.lb_mac + sender_mac + b"\x08\x00" + bytes(outer) + gre
    else:
        outer = (b"\x60\x00\x00\x00" + (4 + inner_len).to_bytes(2, "big") + bytes([47, 64])
                 + ipaddress.IPv6Address(v.peer_ip6).packed + ipaddress.IPv6Address(v.lb_ip6).packed)
        fixed = v.lb_mac + sender_mac + b"\x86\xdd" + outer + gre
    udp_len = (8 + PAYLOAD).to_bytes(2, "big")
    if inner_family == "ipv4":
        head = bytes([0x45, 0]) + inner_len.to_bytes(2, "big") + bytes([0, 0, 0x40, 0, 64, 17, 0, 0])
        src_fixed, random_bytes, dst = bytes([10]), 3, ipaddress.IPv4Address(VIP).packed
        single_src = bytes([0, 0, 1])
    else:
        head = b"\x60\x00\x00\x00" + (8 + PAYLOAD).to_bytes(2, "big") + bytes([17, 64])
        src_fixed, random_bytes, dst = ipaddress.IPv6Address(CLIENTS6).packed[:12], 4, ipaddress.IPv6Address(VIP6).packed
        single_src = bytes([0, 0, 0, 1])
    if flows == "random":
        src, sport = f"{_hx(src_fixed)}, drnd({random_bytes})", "drnd(2)"
    else:
        src, sport = _hx(src_fixed + single_src), _hx((40000).to_bytes(2, "big"))
    parts = [_hx(fixed), _hx(head), src, _hx(dst), sport, _hx((80).to_bytes(2, "big")), _hx(udp_len), "0x00, 0x00",
             f"fill(0x78, {PAYLOAD})"]
    return "{ " + ", ".join(parts) + " }\n"


def run_trafgen(v: VethPair, cfg: str, packets: int, rate: int | None, prefix: Sequence[str],
                new_session: bool = False) -> tuple[int, float]:
    """trafgen out of peer0, after `prefix` (entering the peer's namespace, pinning, nice); (packets it
    sent, wall seconds). Always trafgen's send()-per-packet path (engine_rates.py says why): -b paces it,
    -t 0 runs it flat out; --no-sock-mem and -Q leave sysctls and IRQs alone."""
    cmd = [*prefix, "trafgen", "-o", v.peer_dev, "-i", cfg, "-n", str(packets), "-P", "1", "--no-sock-mem", "-Q"]
    cmd += ["-b", f"{rate}pps"] if rate else ["-t", "0"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, start_new_session=new_session)
    elapsed = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"trafgen failed ({r.returncode}): {r.stderr[-500:]}")
    m = re.search(r"(\d+) packets outgoing", r.stdout + r.stderr)
    return (int(m.group(1)) if m else packets), elapsed
