"""TPACKET_V3 rings and the ring walker the engine runs: struct mirrors, then RX and TX over a veth pair."""

from __future__ import annotations

import ctypes
import errno
import socket

import pytest

from rusty_rail.engines.afpacket import cbpf
from rusty_rail.engines.afpacket import ring as R
from rusty_rail.engines.afpacket.walker import RingWalker, per_frame
from tests.engine_netns import VethPair, drain, gre_frame, ipv4, udp, wait_for
from tests.memory_ring import MemoryRing


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
    assert len(cbpf.inner_flow_fanout_program().fprog) == 16  # struct sock_fprog: u16 len, pointer


class RefusingSocket:
    """Stands in for the ring's socket: refuses `refusals` kicks with `error`, then takes them."""

    def __init__(self, refusals: int, error: OSError) -> None:
        self.refusals, self.kicks, self.error = refusals, 0, error

    def send(self, data: bytes, flags: int = 0) -> int:
        self.kicks += 1
        if self.refusals:
            self.refusals -= 1
            raise self.error
        return 0


@pytest.mark.parametrize("error", [BlockingIOError(errno.EAGAIN, "send buffer full"),
                                   OSError(errno.ENOBUFS, "the device dropped a frame")], ids=["EAGAIN", "ENOBUFS"])
def test_a_refused_kick_is_tried_again(error: OSError) -> None:
    r = R.PacketRing.__new__(R.PacketRing)  # no socket, no mmap: only the kick's bookkeeping
    r.sock, r.tx_pending = RefusingSocket(1, error), 3  # type: ignore[assignment]
    r.tx_kick()
    assert r.tx_pending == 3, "the frames are still SEND_REQUEST: the next kick must send them"
    r.tx_kick()
    assert (r.tx_pending, r.sock.kicks) == (0, 2)  # type: ignore[attr-defined]
    r.tx_kick()
    assert r.sock.kicks == 2, "nothing pending: no syscall"  # type: ignore[attr-defined]


def test_array_views_see_the_mapping_and_are_let_go_before_it_is_unmapped() -> None:
    ring = MemoryRing(rx_blocks=1, tx_frames=4)
    ring.map[100:108] = bytes(range(8))
    assert ring.window(4)[[100, 104, 101]].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [1, 2, 3, 4]]
    ring.tx_words[1, R.TX_STATUS_OFF // 4] = R.TP_STATUS_WRONG_FORMAT
    ring.tx_slots[1, R.TPACKET3_HDRLEN] = 0xAB
    slot = ring.tx_base + ring.tx_frame_size
    assert R.TX_STATUS.unpack_from(ring.map, slot + R.TX_STATUS_OFF)[0] == R.TP_STATUS_WRONG_FORMAT
    assert ring.map[slot + R.TPACKET3_HDRLEN] == 0xAB
    ring.close()
    assert ring.map.closed, "a view still held the mapping"


def test_rx_block_reads_frame_positions_and_leaves_vlan_tagged_frames_out() -> None:
    ring = MemoryRing(rx_blocks=2)
    walker = RingWalker(ring, per_frame(lambda frames, now: []))
    try:
        frames = [bytes([i]) * (60 + 7 * i) for i in range(5)]
        ring.fill(frames, vlan=frozenset({1, 3}))
        base, num, first = ring.next_block()  # type: ignore[misc]
        block = walker.rx_block([(base, num, first)])
        assert block.frames() == [frames[0], frames[2], frames[4]]
        assert walker.stats.rx_vlan_skipped == 2
    finally:
        ring.close()


class Recorder:
    """A block processor that remembers each block and sends back `reply(frame)` for each frame."""

    def __init__(self, reply=lambda f: None) -> None:  # type: ignore[no-untyped-def]
        self.blocks: list[list[bytes]] = []
        self.reply = reply

    def __call__(self, frames: list[bytes], now: float) -> list[bytes]:
        self.blocks.append(list(frames))
        return [out for f in frames if (out := self.reply(f)) is not None]

    @property
    def frames(self) -> list[bytes]:
        return [f for block in self.blocks for f in block]


@pytest.mark.netns
def test_walker_reads_gre_only_in_order_and_sends_what_the_processor_returns(veth: VethPair) -> None:
    v = veth
    with v.inside(v.lb_ns):
        r = R.PacketRing(v.lb_ifindex, tx_frames=16, tx_frame_size=4096)
    cap = v.peer_packet_socket()
    answer = Recorder(lambda f: v.peer_mac + v.lb_mac + f[12:] + b"OUT")
    walker = RingWalker(r, per_frame(answer))
    try:
        assert walker.step(0.0) == -1, "no block before any traffic"
        frames = [gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, ipv4("10.0.0.1", "10.1.0.1", 17, udp(1, i, b"x" * i)))
                  for i in range(5)]
        cap.send(v.lb_mac + v.peer_mac + b"\x08\x06" + bytes(28))  # not GRE: filtered out in the kernel
        for f in frames:
            cap.send(f)
        wait_for(lambda: walker.step(1.0) >= 0 and len(answer.frames) >= len(frames), what="the GRE frames")
        assert answer.frames == frames
        assert drain(cap, lambda f: f.endswith(b"OUT"), len(frames)) == [answer.reply(f) for f in frames]
        s = walker.stats
        assert (s.rx_packets, s.tx_ring, s.tx_spilled, s.tx_failed) == (5, 5, 0, 0)
        assert s.rx_blocks >= len(answer.blocks), "a call may take several retired blocks, never fewer than one"
        assert r.next_block() is None, "every block went back to the kernel"
    finally:
        r.close()
        cap.close()


@pytest.mark.netns
def test_walker_skips_vlan_tagged_frames_when_the_socket_filter_is_off(veth: VethPair) -> None:
    v = veth
    with v.inside(v.lb_ns):
        r = R.PacketRing(v.lb_ifindex, gre_only=False)
    cap = v.peer_packet_socket()
    seen = Recorder()
    walker = RingWalker(r, per_frame(seen))
    try:
        plain = gre_frame(v.lb_mac, v.peer_mac, v.peer_ip, v.lb_ip, ipv4("10.0.0.1", "10.1.0.1", 17, udp(1, 2, b"x")))
        tagged = plain[:12] + b"\x81\x00\x00\x05" + plain[12:]  # 802.1Q, VLAN 5: the kernel moves the tag out
        cap.send(tagged)
        cap.send(plain)
        wait_for(lambda: walker.step(0.0) >= 0 and plain in seen.frames, what="the untagged frame")
        # The kernel strips the tag on receive, so both look like `plain` in the ring; only the flag differs.
        assert walker.stats.rx_vlan_skipped == 1
        assert seen.frames.count(plain) == 1
    finally:
        r.close()
        cap.close()


@pytest.mark.netns
def test_walker_transmit_laps_a_small_tx_ring_in_order_and_spills_what_does_not_fit(veth: VethPair) -> None:
    v = veth
    for ns, dev in ((v.lb_ns, v.lb_dev), (v.peer_ns, v.peer_dev)):
        v.ip(ns, "link", "set", dev, "mtu", "4000")  # a frame too big for a 2 KiB slot, not for the device
    with v.inside(v.lb_ns):
        r = R.PacketRing(v.lb_ifindex, tx_frames=16, tx_frame_size=2048)
        spill = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        spill.bind((v.lb_dev, 0))
    failed: list[int] = []
    walker = RingWalker(r, per_frame(Recorder()), spill, on_tx_failed=lambda: failed.append(1))
    cap = v.peer_packet_socket()
    try:
        # 40 frames through a 16-slot ring: kicked whenever half of it is pending, so no slot is lapped.
        out = [v.peer_mac + v.lb_mac + b"\x08\x00" + ipv4(v.lb_ip, v.peer_ip, 47, bytes(4 + i)) for i in range(40)]
        walker.transmit(out)
        assert drain(cap, lambda f: f[6:12] == v.lb_mac and f[23] == 47, len(out)) == out
        assert walker.stats.tx_ring == 40

        big = v.peer_mac + v.lb_mac + b"\x08\x00" + ipv4(v.lb_ip, v.peer_ip, 47, bytes(3000))
        walker.transmit([big])  # beyond the slot: sent by the spill socket, whole
        assert drain(cap, lambda f: f == big, 1) == [big]
        assert (walker.stats.tx_spilled, walker.stats.tx_failed) == (1, 0)

        huge = big + bytes(2000)  # beyond the device's MTU too: neither takes it, and it is counted
        walker.transmit([huge])
        assert (walker.stats.tx_spilled, walker.stats.tx_failed, failed) == (1, 1, [1])
    finally:
        r.close()
        spill.close()
        cap.close()


@pytest.mark.netns
def test_fanout_program_is_accepted(veth: VethPair) -> None:
    with veth.inside(veth.lb_ns):
        rings = [R.PacketRing(veth.lb_ifindex) for _ in range(2)]
    try:
        for r in rings:
            r.join_fanout(0x4242, cbpf.inner_flow_fanout_program())
    finally:
        for r in rings:
            r.close()
