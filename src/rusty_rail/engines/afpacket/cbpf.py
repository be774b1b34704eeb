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
BPF_JA, BPF_JEQ, BPF_JSET = 0x00, 0x10, 0x40
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10
BPF_TAX, BPF_TXA = 0x00, 0x80
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0
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
    """Socket filter: keep untagged IPv4 frames of protocol 47 and IPv6 frames of next header 47 only.

    Everything else is PASS by docs/WIRE.md section 1 (an IPv6 packet with extension headers before GRE
    included), which needs no action from the engine: the host stack has its own copy. Filtering in the
    kernel keeps ARP, neighbour discovery, SSH and the like out of the ring. Offsets are from the
    Ethernet header (packet sockets see the frame from the MAC header).
    """
    return SocketFilter(assemble([
        (BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT),
        (BPF_JMP | BPF_JEQ | BPF_K, 0, None, "drop"),  # tag in metadata: VLAN frame, not ours
        (BPF_LD | BPF_H | BPF_ABS, 12),
        (BPF_JMP | BPF_JEQ | BPF_K, 0x0800, None, "ipv6"),
        (BPF_LD | BPF_B | BPF_ABS, 14 + 9),  # IPv4 protocol
        (BPF_JMP | BPF_JEQ | BPF_K, 47, "keep", "drop"),
        "ipv6",
        (BPF_JMP | BPF_JEQ | BPF_K, 0x86DD, None, "drop"),
        (BPF_LD | BPF_B | BPF_ABS, 14 + 6),  # IPv6 next header
        (BPF_JMP | BPF_JEQ | BPF_K, 47, "keep", "drop"),
        "drop",
        (BPF_RET | BPF_K, 0),
        "keep",
        (BPF_RET | BPF_K, 0x40000),
    ]))


def inner_flow_fanout_program() -> SocketFilter:
    """PACKET_FANOUT_CBPF program: a hash of the INNER source and destination addresses of a GRE packet,
    over IPv4 or IPv6, carrying IPv4 or IPv6.

    The kernel takes `return value % workers`. Hashing only inner addresses keeps every packet of a flow
    (ICMP errors about it excepted) on one worker, and spreads clients over workers, while one router's
    tunnel (a single outer src/dst pair) would put everything on one worker with an outer hash. The
    inner IPv6 addresses are folded by XOR of their eight 32-bit words. Non-GRE and outer IPv4 fragments
    go to worker 0 (they are passed or dropped, no state involved). Loads use SKF_NET_OFF so they are
    relative to the outer IP header whatever skb->data points at; the outer family is skb->protocol.
    GRE header length = 4 + 4 for each of C (0x80), K (0x20), S (0x10) in the first flags byte.
    Scratch memory: M[0] GRE flags, M[1] inner header offset, M[2] hash so far, M[3] GRE protocol.
    """
    n = SKF_NET_OFF
    prog: list[AsmInsn | str] = [
        (BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL),  # A = outer EtherType (host order)
        (BPF_JMP | BPF_JEQ | BPF_K, 0x0800, None, "outer6"),
        (BPF_LD | BPF_B | BPF_ABS, n + 9),
        (BPF_JMP | BPF_JEQ | BPF_K, 47, None, "other"),  # not GRE
        (BPF_LD | BPF_H | BPF_ABS, n + 6),
        (BPF_JMP | BPF_JSET | BPF_K, 0x3FFF, "other", None),  # outer fragment
        (BPF_LDX | BPF_B | BPF_MSH, n + 0),  # X = outer IHL * 4
        (BPF_JMP | BPF_JA, "gre"),
        "outer6",
        (BPF_JMP | BPF_JEQ | BPF_K, 0x86DD, None, "other"),
        (BPF_LD | BPF_B | BPF_ABS, n + 6),
        (BPF_JMP | BPF_JEQ | BPF_K, 47, None, "other"),  # next header not GRE: the host's
        (BPF_LDX | BPF_IMM, 40),  # X = the fixed header's length
        "gre",
        (BPF_LD | BPF_H | BPF_IND, n + 2),  # A = GRE protocol
        (BPF_ST, 3),
        (BPF_LD | BPF_B | BPF_IND, n + 0),  # A = GRE flags, first byte
        (BPF_ST, 0),
        (BPF_MISC | BPF_TXA, 0),
        (BPF_ALU | BPF_ADD | BPF_K, 4),  # + base GRE header
        (BPF_ST, 1),
    ]
    for bit in (0x80, 0x20, 0x10):  # C, K, S
        skip = f"no{bit:x}"
        prog += [
            (BPF_LD | BPF_MEM, 0),
            (BPF_JMP | BPF_JSET | BPF_K, bit, None, skip),
            (BPF_LD | BPF_MEM, 1),
            (BPF_ALU | BPF_ADD | BPF_K, 4),
            (BPF_ST, 1),
            skip,
        ]
    prog += [
        (BPF_LDX | BPF_MEM, 1),  # X = inner header offset
        (BPF_LD | BPF_MEM, 3),
        (BPF_JMP | BPF_JEQ | BPF_K, 0x86DD, "inner6", None),
        (BPF_LD | BPF_W | BPF_IND, n + 12),  # inner IPv4 src
        (BPF_ST, 2),
        (BPF_LD | BPF_W | BPF_IND, n + 16),  # inner IPv4 dst
        (BPF_LDX | BPF_MEM, 2),
        (BPF_ALU | BPF_XOR | BPF_X, 0),
        (BPF_JMP | BPF_JA, "mix"),
        "inner6",
        (BPF_LD | BPF_W | BPF_IND, n + 8),  # inner IPv6 src, first word
        (BPF_ST, 2),
    ]
    for offset in range(12, 40, 4):  # the other seven words of src and dst, XORed in
        prog += [
            (BPF_LD | BPF_W | BPF_IND, n + offset),
            (BPF_LDX | BPF_MEM, 2),
            (BPF_ALU | BPF_XOR | BPF_X, 0),
            (BPF_ST, 2),
            (BPF_LDX | BPF_MEM, 1),  # X is the index again
        ]
    prog += [
        (BPF_LD | BPF_MEM, 2),
        "mix",
        (BPF_ALU | BPF_MUL | BPF_K, 0x9E3779B1),  # spread bits upwards
        (BPF_MISC | BPF_TAX, 0),
        (BPF_ALU | BPF_RSH | BPF_K, 16),
        (BPF_ALU | BPF_XOR | BPF_X, 0),  # fold the high half down (the kernel takes % n)
        (BPF_RET | BPF_A, 0),
        "other",
        (BPF_RET | BPF_K, 0),  # not GRE / fragment -> worker 0
    ]
    return SocketFilter(assemble(prog))


AsmInsn = tuple
"""(code, k) or (code, k, jt, jf) with jt/jf None (the next instruction) or a label; (BPF_JA, label)."""


def assemble(program: Sequence[AsmInsn | str]) -> list[Insn]:
    """Classic BPF from instructions and labels (strings mark the next instruction's place): jump offsets
    counted for us, so a program can be edited without recounting them by hand."""
    labels: dict[str, int] = {}
    insns: list[tuple] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out: list[Insn] = []
    for pc, insn in enumerate(insns):
        code = insn[0]
        if code == BPF_JMP | BPF_JA:
            out.append((code, 0, 0, labels[insn[1]] - pc - 1))
            continue
        if len(insn) == 2:
            out.append((code, 0, 0, insn[1]))
            continue
        _, k, jt, jf = insn
        offsets = [0 if target is None else labels[target] - pc - 1 for target in (jt, jf)]
        if not all(0 <= o <= 255 for o in offsets):
            raise ValueError(f"instruction {pc}: a conditional jump reaches 255 instructions at most")
        out.append((code, offsets[0], offsets[1], k))
    return out
