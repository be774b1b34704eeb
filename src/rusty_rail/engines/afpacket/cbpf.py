"""Classic BPF for the AF_PACKET engine's sockets: the socket filter and the fanout program.

Classic BPF (struct sock_filter, <linux/filter.h>), not eBPF: these run in the kernel's packet-socket
paths (SO_ATTACH_FILTER, PACKET_FANOUT_DATA), which take classic programs. The name `SocketFilter`
keeps them apart from rusty_rail.bpf.libbpf's eBPF programs.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence

SO_ATTACH_FILTER = 26

# struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
SOCK_FILTER = struct.Struct("=HBBI")
BPF_LD, BPF_LDX, BPF_ST, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0xA0
BPF_ADD, BPF_MUL, BPF_RSH, BPF_XOR = 0x00, 0x20, 0x70, 0xA0
BPF_JEQ, BPF_JSET = 0x10, 0x40
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10
BPF_TAX, BPF_TXA = 0x00, 0x80
SKF_AD_OFF = -0x1000
SKF_AD_VLAN_TAG_PRESENT = 48
SKF_NET_OFF = -0x100000

Insn = tuple[int, int, int, int]


def _u32(k: int) -> int:
    return k & 0xFFFFFFFF


class SocketFilter:
    """A classic BPF program and the `struct sock_fprog` pointing at it (kept alive with this object:
    the kernel copies the instructions at setsockopt time, but only while the buffer exists)."""

    def __init__(self, insns: Sequence[Insn]) -> None:
        raw = b"".join(SOCK_FILTER.pack(code, jt, jf, _u32(k)) for code, jt, jf, k in insns)
        self.insns = len(insns)
        self._buf = ctypes.create_string_buffer(raw, len(raw))
        # struct sock_fprog { unsigned short len; struct sock_filter *filter; } (pointer 8-aligned)
        self.fprog = struct.pack("HL", len(insns), ctypes.addressof(self._buf))


def gre_only_filter() -> SocketFilter:
    """Socket filter: keep untagged IPv4 frames of protocol 47 only.

    Everything else is PASS by docs/WIRE.md section 1, which needs no action from the engine: the host
    stack has its own copy. Filtering in the kernel keeps ARP, SSH and the like out of the ring.
    Offsets are from the Ethernet header (packet sockets see the frame from the MAC header).
    """
    return SocketFilter(
        [
            (BPF_LD | BPF_W | BPF_ABS, 0, 0, SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT),
            (BPF_JMP | BPF_JEQ | BPF_K, 0, 4, 0),  # tag in metadata: VLAN frame, not ours
            (BPF_LD | BPF_H | BPF_ABS, 0, 0, 12),
            (BPF_JMP | BPF_JEQ | BPF_K, 0, 2, 0x0800),
            (BPF_LD | BPF_B | BPF_ABS, 0, 0, 23),
            (BPF_JMP | BPF_JEQ | BPF_K, 1, 0, 47),
            (BPF_RET | BPF_K, 0, 0, 0),
            (BPF_RET | BPF_K, 0, 0, 0x40000),
        ]
    )


def inner_flow_fanout_program() -> SocketFilter:
    """PACKET_FANOUT_CBPF program: a hash of the INNER IPv4 src and dst of a GRE packet.

    The kernel takes `return value % workers`. Hashing only inner addresses keeps every packet of a flow
    (fragments, ICMP errors about it excepted) on one worker, and spreads clients over workers, while one
    router's tunnel (a single outer src/dst pair) would put everything on one worker with an outer hash.
    Non-GRE and outer fragments go to worker 0 (they are passed or dropped, no state involved).
    Loads use SKF_NET_OFF so they are relative to the IP header whatever skb->data points at.
    GRE header length = 4 + 4 for each of C (0x80), K (0x20), S (0x10) in the first flags byte.
    """
    n = SKF_NET_OFF
    prog: list[Insn] = [
        (BPF_LD | BPF_B | BPF_ABS, 0, 0, n + 9),  # 0: A = outer protocol
        (BPF_JMP | BPF_JEQ | BPF_K, 0, 34, 47),  # 1: not GRE -> 36
        (BPF_LD | BPF_H | BPF_ABS, 0, 0, n + 6),  # 2: A = flags/fragment offset
        (BPF_JMP | BPF_JSET | BPF_K, 32, 0, 0x3FFF),  # 3: outer fragment -> 36
        (BPF_LDX | BPF_B | BPF_MSH, 0, 0, n + 0),  # 4: X = outer IHL * 4
        (BPF_LD | BPF_B | BPF_IND, 0, 0, n + 0),  # 5: A = GRE flags, first byte
        (BPF_ST, 0, 0, 0),  # 6: M[0] = flags
        (BPF_MISC | BPF_TXA, 0, 0, 0),  # 7: A = X
        (BPF_ALU | BPF_ADD | BPF_K, 0, 0, 4),  # 8: + base GRE header
        (BPF_ST, 0, 0, 1),  # 9: M[1] = offset of the inner header, so far
    ]
    for bit in (0x80, 0x20, 0x10):  # C, K, S: 10-14, 15-19, 20-24
        prog += [
            (BPF_LD | BPF_MEM, 0, 0, 0),
            (BPF_JMP | BPF_JSET | BPF_K, 0, 3, bit),
            (BPF_LD | BPF_MEM, 0, 0, 1),
            (BPF_ALU | BPF_ADD | BPF_K, 0, 0, 4),
            (BPF_ST, 0, 0, 1),
        ]
    prog += [
        (BPF_LDX | BPF_MEM, 0, 0, 1),  # 25: X = inner header offset
        (BPF_LD | BPF_W | BPF_IND, 0, 0, n + 12),  # 26: A = inner src
        (BPF_ST, 0, 0, 2),  # 27: M[2] = src
        (BPF_LD | BPF_W | BPF_IND, 0, 0, n + 16),  # 28: A = inner dst
        (BPF_LDX | BPF_MEM, 0, 0, 2),  # 29: X = src
        (BPF_ALU | BPF_XOR | BPF_X, 0, 0, 0),  # 30: A = src ^ dst
        (BPF_ALU | BPF_MUL | BPF_K, 0, 0, 0x9E3779B1),  # 31: spread bits upwards
        (BPF_MISC | BPF_TAX, 0, 0, 0),  # 32: X = A
        (BPF_ALU | BPF_RSH | BPF_K, 0, 0, 16),  # 33
        (BPF_ALU | BPF_XOR | BPF_X, 0, 0, 0),  # 34: fold the high half down (the kernel takes % n)
        (BPF_RET | BPF_A, 0, 0, 0),  # 35
        (BPF_RET | BPF_K, 0, 0, 0),  # 36: not GRE / fragment -> worker 0
    ]
    assert len(prog) == 37
    return SocketFilter(prog)
