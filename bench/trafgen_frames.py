"""The benchmarks' GRE frame as a trafgen configuration (trafgen, Debian netsniff-ng)."""

from __future__ import annotations

from tests.engine_netns import VethPair, checksum


def trafgen_config(v: VethPair, flows: str, sender_mac: bytes) -> str:
    """The frame as a trafgen config: fixed Ethernet + outer IPv4 + GRE; inner source and port random."""
    outer = bytearray(bytes([0x45, 0]) + (20 + 4 + 46).to_bytes(2, "big") + b"\0\0\x40\x00" + bytes([64, 47]) + b"\0\0"
                      + bytes(map(int, v.peer_ip.split("."))) + bytes(map(int, v.lb_ip.split("."))))
    outer[10:12] = checksum(bytes(outer)).to_bytes(2, "big")
    fixed = v.lb_mac + sender_mac + b"\x08\x00" + bytes(outer) + b"\x00\x00\x08\x00"
    inner_head = bytes([0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0])  # checksum 0: not verified (WIRE.md 4)
    dst, dport, ulen = bytes([10, 1, 0, 1]), (80).to_bytes(2, "big"), (26).to_bytes(2, "big")
    hx = lambda b: ", ".join(f"0x{x:02x}" for x in b)  # noqa: E731
    if flows == "random":
        src, sport = "0x0a, drnd(3)", "drnd(2)"
    else:
        src, sport = hx(bytes([10, 0, 0, 1])), hx((40000).to_bytes(2, "big"))
    parts = [hx(fixed), hx(inner_head), src, hx(dst), sport, hx(dport), hx(ulen), "0x00, 0x00", "fill(0x78, 18)"]
    return "{ " + ", ".join(parts) + " }\n"
