"""TPACKET_V3 rings from pure Python: struct mirrors, and RX/TX round trips over a veth pair."""

from __future__ import annotations

import ctypes

import pytest

from rusty_rail.engines import ring as R
from tests.engine_netns import VethPair, drain, gre_frame, ipv4, udp, wait_for


class TpacketHdrVariant1(ctypes.Structure):
    _fields_ = [("tp_rxhash", ctypes.c_uint32), ("tp_vlan_tci", ctypes.c_uint32),
                ("tp_vlan_tpid", ctypes.c_uint16), ("tp_padding", ctypes.c_uint16)]


class Tpacket3Hdr(ctypes.Structure):
    """<linux/if_packet.h> struct tpacket3_hdr."""
    _fields_ = [("tp_next_offset", ctypes.c_uint32), ("tp_sec", ctypes.c_uint32), ("tp_nsec", ctypes.c_uint32),
                ("tp_snaplen", ctypes.c_uint32), ("tp_len", ctypes.c_uint32), ("tp_status", ctypes.c_uint32),
                ("tp_mac", ctypes.c_uint16), ("tp_net", ctypes.c_uint16), ("hv1", TpacketHdrVariant1),
                ("tp_padding", ctypes.c_uint8 * 8)]


class TpacketHdrV1(ctypes.Structure):
    _fields_ = [("block_status", ctypes.c_uint32), ("num_pkts", ctypes.c_uint32),
                ("offset_to_first_pkt", ctypes.c_uint32), ("blk_len", ctypes.c_uint32),
                ("seq_num", ctypes.c_uint64), ("ts_first_pkt", ctypes.c_uint32 * 2),
                ("ts_last_pkt", ctypes.c_uint32 * 2)]


class TpacketBlockDesc(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("offset_to_priv", ctypes.c_uint32), ("hdr", TpacketHdrV1)]


def test_struct_mirrors_match_the_kernel_headers() -> None:
    assert ctypes.sizeof(Tpacket3Hdr) == 48 == R.TPACKET3_HDRLEN
    assert R.TPACKET3_HDR.unpack(bytes(Tpacket3Hdr(tp_next_offset=1, tp_snaplen=2, tp_status=3, tp_mac=4))[:26]) == (
        1, 2, 3, 4)
    assert R.TX_FIELDS_OFF == Tpacket3Hdr.tp_snaplen.offset and Tpacket3Hdr.tp_len.offset == R.TX_FIELDS_OFF + 4
    assert R.TX_STATUS_OFF == Tpacket3Hdr.tp_status.offset
    desc = TpacketBlockDesc()
    desc.hdr.block_status, desc.hdr.num_pkts, desc.hdr.offset_to_first_pkt = 5, 6, 7
    assert R.BLOCK_DESC.unpack_from(bytes(desc)) == (5, 6, 7)
    assert R.BLOCK_STATUS_OFF == TpacketBlockDesc.hdr.offset
    assert R.TPACKET_REQ3.size == 28
    assert len(R.inner_flow_fanout_program().fprog) == 16


def read_block(r: R.PacketRing) -> list[tuple[int, bytes]]:
    """(tp_status, frame) of every packet in the next block, then release it."""
    base, num, first = wait_for(r.rx_block)
    out = []
    off = base + first
    for _ in range(num):
        nxt, snap, status, mac = R.TPACKET3_HDR.unpack_from(r.map, off)
        out.append((status, r.map[off + mac : off + mac + snap]))
        off += nxt
    r.rx_release(base)
    return out


@pytest.mark.netns
def test_rx_ring_sees_gre_only_and_tx_ring_sends(veth: VethPair) -> None:
    v = veth
    with v.inside(v.lb_ns):
        r = R.PacketRing(v.lb_ifindex, tx_frames=16, tx_frame_size=4096)
    cap = v.peer_packet_socket()
    try:
        frames = [gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, ipv4("10.0.0.1", "10.1.0.1", 17, udp(1, i, b"x" * i)))
                  for i in range(5)]
        cap.send(v.lb_mac + v.peer_mac + b"\x08\x06" + bytes(28))  # not GRE: filtered out in the kernel
        for f in frames:
            cap.send(f)
        got: list[bytes] = []
        while len(got) < len(frames):
            for status, frame in read_block(r):
                assert status & R.TP_STATUS_USER
                got.append(frame)
        assert got == frames

        # TX: 40 frames through a 16-slot ring, kicking whenever half of it is pending.
        out = [v.peer_mac + v.lb_mac + b"\x08\x00" + ipv4(v.lb_ip, v.peer_ip, 47, bytes(4 + i)) for i in range(40)]
        for f in out:
            assert wait_for(lambda f=f: r.tx_put(f))
            if r.tx_pending >= r.tx_kick_at:
                r.tx_kick()
        r.tx_kick()
        received = drain(cap, lambda f: f[6:12] == v.lb_mac and f[23] == 47, len(out))
        assert received == out
        assert not r.tx_put(bytes(r.tx_max_len + 1)), "an oversized frame is refused, not truncated"
    finally:
        r.close()
        cap.close()


@pytest.mark.netns
def test_fanout_program_is_accepted(veth: VethPair) -> None:
    with veth.inside(veth.lb_ns):
        rings = [R.PacketRing(veth.lb_ifindex) for _ in range(2)]
    try:
        for r in rings:
            r.join_fanout(0x4242, R.inner_flow_fanout_program())
    finally:
        for r in rings:
            r.close()
