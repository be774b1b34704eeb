"""A classic BPF interpreter (the instructions engines/afpacket/cbpf.py uses), for testing those programs
on frames without a kernel: Documentation/networking/filter.rst's semantics, including SKF_NET_OFF loads
(relative to the network header, 14 bytes into an untagged frame), the protocol and VLAN ancillary loads,
and a load past the packet ending the program with 0."""

from __future__ import annotations

from rusty_rail.engines.afpacket import cbpf as c

_M32 = 0xFFFFFFFF


class _OutOfPacket(Exception):
    pass


def run(insns: list[c.Insn], frame: bytes, vlan_tagged: bool = False) -> int:
    """The program's return value for `frame` (an untagged Ethernet frame; `vlan_tagged`: the kernel
    took a tag into metadata)."""
    a = x = 0
    mem = [0] * 16
    pc = 0

    def load(offset: int, size: int) -> int:
        if offset <= c.SKF_AD_OFF + 0x100 and offset >= c.SKF_AD_OFF:
            ancillary = offset - c.SKF_AD_OFF
            if ancillary == c.SKF_AD_PROTOCOL:
                return int.from_bytes(frame[12:14], "big")
            if ancillary == c.SKF_AD_VLAN_TAG_PRESENT:
                return int(vlan_tagged)
            raise NotImplementedError(ancillary)
        if offset >= c.SKF_NET_OFF and offset < c.SKF_NET_OFF + 0x10000:
            offset = offset - c.SKF_NET_OFF + 14
        if offset < 0 or offset + size > len(frame):
            raise _OutOfPacket
        return int.from_bytes(frame[offset : offset + size], "big")

    try:
        while True:
            code, jt, jf, k = insns[pc]
            pc += 1
            cls = code & 0x07
            size = {c.BPF_W: 4, c.BPF_H: 2, c.BPF_B: 1}[code & 0x18] if cls in (c.BPF_LD, c.BPF_LDX) else 0
            mode = code & 0xE0
            if cls == c.BPF_LD:
                if mode == c.BPF_ABS:
                    a = load(_signed(k), size)
                elif mode == c.BPF_IND:
                    a = load(_signed(k) + x, size)
                elif mode == c.BPF_MEM:
                    a = mem[k]
                else:
                    a = k
            elif cls == c.BPF_LDX:
                if mode == c.BPF_MEM:
                    x = mem[k]
                elif mode == c.BPF_MSH:
                    x = (load(_signed(k), 1) & 0x0F) * 4
                else:
                    x = k
            elif cls == c.BPF_ST:
                mem[k] = a
            elif cls == c.BPF_ALU:
                operand = x if code & c.BPF_X else k
                op = code & 0xF0
                if op == c.BPF_ADD:
                    a = (a + operand) & _M32
                elif op == c.BPF_MUL:
                    a = (a * operand) & _M32
                elif op == c.BPF_RSH:
                    a = a >> operand
                elif op == c.BPF_XOR:
                    a = a ^ operand
                else:
                    raise NotImplementedError(hex(code))
            elif cls == c.BPF_JMP:
                op = code & 0xF0
                if op == c.BPF_JA:
                    pc += k
                elif op == c.BPF_JEQ:
                    pc += jt if a == k else jf
                elif op == c.BPF_JSET:
                    pc += jt if a & k else jf
                else:
                    raise NotImplementedError(hex(code))
            elif cls == c.BPF_RET:
                return a if code & c.BPF_A else k
            elif cls == c.BPF_MISC:
                if code & 0xF8 == c.BPF_TAX:
                    x = a
                else:
                    a = x
    except _OutOfPacket:
        return 0


def _signed(k: int) -> int:
    return k - (1 << 32) if k & 0x80000000 else k


def program(socket_filter: c.SocketFilter) -> list[c.Insn]:
    """The instructions a SocketFilter holds, read back from its buffer."""
    raw = bytes(socket_filter._buf)
    return [c.SOCK_FILTER.unpack_from(raw, i * c.SOCK_FILTER.size) for i in range(socket_filter.insns)]
