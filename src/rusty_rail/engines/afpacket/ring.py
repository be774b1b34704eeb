"""TPACKET_V3 RX and TX rings on one AF_PACKET socket, from pure Python (socket + mmap + struct).

Layouts mirror <linux/if_packet.h>; tests/test_engine_ring.py checks the offsets we rely on against
ctypes mirrors of the kernel's structs. One socket owns both rings; the mmap holds the RX ring first,
then the TX ring. This module owns the socket, the mapping and the ring geometry; walker.py is the one
code that reads and writes frames in it.

RX (TPACKET_V3): the kernel fills whole blocks; a block belongs to us while its block_status has
TP_STATUS_USER, and goes back when we write TP_STATUS_KERNEL. TX: V3 has no block mode for TX, so the TX
ring is frames of `tx_frame_size`; we write a tpacket3_hdr (tp_len, status SEND_REQUEST) and the frame at
offset 48, then one send() kicks everything pending.

Why "half the TX ring": the kernel walks the TX ring from its own head index and stops at the first frame
that is not SEND_REQUEST. If we filled all of it in one go, a frame we lapped could still be in flight and
the two indices disagree from then on (measured on kernel 6.18). So the walker never writes a slot that is
not AVAILABLE, and kicks once `tx_kick_at` frames (half the ring at most) are pending.

Frames we hand to send() are attached to skbs zero-copy (page frags of the ring), so a frame only becomes
AVAILABLE again when the skb is freed, possibly by a slow receiver; nothing may block on it.

The mapping is also seen as numpy arrays for work on a whole block at once (`u8`, `u32`, the TX slots
as rows, `window(width)`), and as a memoryview of 32-bit words (`words`) for the one walk that must go
frame by frame (each frame header says where the next one is). close() lets go of them before it unmaps.
"""

from __future__ import annotations

import errno
import mmap
import socket
import struct

import numpy as np

from rusty_rail.engines.afpacket.cbpf import SO_ATTACH_FILTER, SocketFilter, gre_only_filter

# <linux/if_packet.h>, <linux/if_ether.h>
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_FANOUT = 18
PACKET_QDISC_BYPASS = 20
PACKET_FANOUT_DATA = 22
PACKET_IGNORE_OUTGOING = 23
TPACKET_V3 = 2
ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32

PACKET_FANOUT_HASH = 0
PACKET_FANOUT_CBPF = 6
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000
PACKET_FANOUT_FLAG_DEFRAG = 0x8000

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1
TP_STATUS_SENDING = 2
TP_STATUS_WRONG_FORMAT = 4

# struct tpacket_req3: block_size, block_nr, frame_size, frame_nr, retire_blk_tov, sizeof_priv, feature_req_word
TPACKET_REQ3 = struct.Struct("=7I")
# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1: block_status, num_pkts,
# offset_to_first_pkt (we read these three only)
BLOCK_DESC = struct.Struct("=8xIII")
BLOCK_STATUS_OFF = 8
# struct tpacket3_hdr: tp_next_offset @0, tp_snaplen @12, tp_status @20, tp_mac @24 (sizeof 48)
TPACKET3_HDR = struct.Struct("=I8xI4xIH")
TPACKET3_HDRLEN = 48  # TPACKET_ALIGN(sizeof(struct tpacket3_hdr)); TX data starts here
# TX header fields written in one go: tp_snaplen @12, tp_len @16, tp_status @20
TX_FIELDS = struct.Struct("=III")
TX_FIELDS_OFF = 12
TX_STATUS = struct.Struct("=I")
TX_STATUS_OFF = 20
# struct tpacket_stats_v3: tp_packets, tp_drops, tp_freeze_q_cnt
TPACKET_STATS_V3 = struct.Struct("=III")


class PacketRing:
    """An AF_PACKET socket bound to one interface, with a TPACKET_V3 RX ring and a TX ring.

    Sizes: RX `rx_block_size * rx_blocks` (blocks of whole packets, retired after `rx_block_tov_ms` even
    when not full so latency stays bounded at low rates); TX `tx_frames` slots of `tx_frame_size`, which
    must hold the device's MTU + 14 + 48. Defaults: 32 MiB RX, 2 MiB TX.

    Many small blocks rather than a few big ones: at low rates every block is retired by the timeout
    nearly empty, so the ring buffers `rx_blocks * rx_block_tov_ms` of traffic, not its byte size.
    32 blocks x 2 ms (64 ms) lost 15-40% at 60 kpps behind a 3 us decide(); 256 x 2 ms loses nothing.
    The timeout is also the latency a frame may wait at low rates (user space sees a block only once
    it is retired), so it is the kernel's least, 1 ms: request/response traffic (wrk, 1 KiB objects,
    64 connections, lab topology 2) went from 0.61x (2 ms, 5 rounds) to 0.82x (1 ms, 3 rounds, a later
    run) of HAProxy's requests/s.
    """

    def __init__(
        self,
        ifindex: int,
        *,
        rx_block_size: int = 1 << 17,
        rx_blocks: int = 256,
        rx_block_tov_ms: int = 1,
        tx_frame_size: int = 2048,
        tx_frames: int = 1024,
        gre_only: bool = True,
        qdisc_bypass: bool = True,
    ) -> None:
        if rx_block_size % mmap.PAGESIZE or tx_frame_size % 16 or (tx_frame_size * tx_frames) % mmap.PAGESIZE:
            raise ValueError("ring sizes must be page multiples (frames: multiples of 16)")
        self.ifindex = ifindex
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self._filters: list[SocketFilter] = []  # their buffers must outlive the setsockopt calls that read them
        try:
            self._setup(rx_block_size, rx_blocks, rx_block_tov_ms, tx_frame_size, tx_frames, gre_only, qdisc_bypass)
        except BaseException:
            self.sock.close()
            raise

    def _setup(
        self,
        rx_block_size: int,
        rx_blocks: int,
        tov_ms: int,
        tx_frame_size: int,
        tx_frames: int,
        gre_only: bool,
        qdisc_bypass: bool,
    ) -> None:
        s = self.sock
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        # We must not see our own forwards coming back as RX (a fanout group needs its own flag too).
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        if gre_only:
            # Attached before the ring and bind, so nothing else is ever queued.
            gre = gre_only_filter()
            self._filters.append(gre)
            s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, gre.fprog)
        if qdisc_bypass:
            s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        # The rings are the buffers; these only matter for the skbs accounted to the socket (TX in flight).
        # *FORCE works inside a netns where net.core.[rw]mem_max cannot be raised.
        for opt in (SO_RCVBUFFORCE, SO_SNDBUFFORCE):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, 16 << 20)
            except PermissionError:
                pass
        rx_frame = 2048  # only used for the kernel's frame count arithmetic in V3
        s.setsockopt(
            SOL_PACKET,
            PACKET_RX_RING,
            TPACKET_REQ3.pack(
                rx_block_size, rx_blocks, rx_frame, rx_block_size // rx_frame * rx_blocks, tov_ms, 0, 0
            ),
        )
        s.setsockopt(
            SOL_PACKET,
            PACKET_TX_RING,
            TPACKET_REQ3.pack(tx_frame_size * tx_frames, 1, tx_frame_size, tx_frames, 0, 0, 0),
        )
        self.rx_size = rx_block_size * rx_blocks
        self.tx_size = tx_frame_size * tx_frames
        self.map = mmap.mmap(s.fileno(), self.rx_size + self.tx_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.rx_block_size = rx_block_size
        self.rx_blocks = rx_blocks
        self.rx_index = 0
        """The next block to read: the kernel hands blocks out strictly in order."""
        self.tx_frame_size = tx_frame_size
        self.tx_frames = tx_frames
        self.tx_base = self.rx_size
        self.tx_max_len = tx_frame_size - TPACKET3_HDRLEN
        self.tx_index = 0
        """The next TX slot to write."""
        self.tx_pending = 0
        """Slots written SEND_REQUEST since the last kick."""
        self.tx_kick_at = max(1, tx_frames // 2)
        self._views()
        s.bind((socket.if_indextoname(self.ifindex), ETH_P_ALL))
        s.setblocking(False)

    def _views(self) -> None:
        """The mapping as numpy bytes and 32-bit words, and as a memoryview of words (sizes are page multiples)."""
        self.u8 = np.frombuffer(self.map, dtype=np.uint8)
        self.u32 = self.u8.view(np.uint32)
        self.tx_slots = self.u8[self.tx_base :].reshape(self.tx_frames, self.tx_frame_size)
        """The TX ring as rows of bytes, one per slot: writes for many slots at once."""
        self.tx_words = self.u32[self.tx_base // 4 :].reshape(self.tx_frames, self.tx_frame_size // 4)
        """The same rows as 32-bit words (the slots' tpacket3_hdr fields)."""
        self.words = memoryview(self.map).cast("I")
        self._windows: dict[int, np.ndarray] = {}

    def window(self, width: int) -> np.ndarray:
        """The mapping as overlapping read-only rows of `width` bytes, row i holding bytes i to i + width:
        `window(w)[offsets]` gathers w bytes at each offset in one step, without an index per byte."""
        rows = self._windows.get(width)
        if rows is None:
            rows = np.lib.stride_tricks.as_strided(self.u8, (len(self.u8) - width + 1, width), (1, 1), writeable=False)
            self._windows[width] = rows
        return rows

    def _drop_views(self) -> None:
        """Let go of every view of the mapping, so that it can be unmapped."""
        words = getattr(self, "words", None)
        if words is not None:
            words.release()
        self.u8 = self.u32 = self.tx_slots = self.tx_words = None  # type: ignore[assignment]  # exports go with them
        self._windows = {}

    # -- fanout -----------------------------------------------------------------------------------

    def join_fanout(self, group: int, program: SocketFilter | None = None) -> None:
        """Join fanout `group` (16 bits): CBPF with `program`, else the kernel's flow hash."""
        flags = PACKET_FANOUT_FLAG_IGNORE_OUTGOING
        mode = PACKET_FANOUT_CBPF if program is not None else PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG
        arg = (group & 0xFFFF) | ((mode | flags) << 16)
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_FANOUT, arg)
        except OSError:
            # Kernels before 6.9 lack FLAG_IGNORE_OUTGOING; our own forwards are skipped by the group anyway.
            self.sock.setsockopt(SOL_PACKET, PACKET_FANOUT, arg & ~(flags << 16))
        if program is not None:
            self._filters.append(program)
            self.sock.setsockopt(SOL_PACKET, PACKET_FANOUT_DATA, program.fprog)

    # -- RX blocks --------------------------------------------------------------------------------

    def next_block(self) -> tuple[int, int, int] | None:
        """(block offset, packet count, offset of the first packet) of the next block we own, else None."""
        ready = self.ready_blocks(1)
        return ready[0] if ready else None

    def ready_blocks(self, most: int) -> list[tuple[int, int, int]]:
        """The blocks we own from the next one on, in ring order, at most `most` of them: (block offset,
        packet count, offset of the first packet) each. They go back with release_block(), in order."""
        ready: list[tuple[int, int, int]] = []
        index = self.rx_index
        while len(ready) < most:
            base = index * self.rx_block_size
            status, num, first = BLOCK_DESC.unpack_from(self.map, base)
            if not status & TP_STATUS_USER:
                break
            ready.append((base, num, first))
            index = index + 1 if index + 1 < self.rx_blocks else 0
        return ready

    def release_block(self, base: int) -> None:
        """Give the block at `base` back to the kernel and move on to the next one."""
        TX_STATUS.pack_into(self.map, base + BLOCK_STATUS_OFF, TP_STATUS_KERNEL)
        self.rx_index += 1
        if self.rx_index == self.rx_blocks:
            self.rx_index = 0

    # -- TX ---------------------------------------------------------------------------------------

    def tx_kick(self) -> None:
        """Ask the kernel to send every SEND_REQUEST frame. Never blocks (frames may stay SENDING).

        When the socket's send buffer is full (skbs still in flight) the kernel refuses with EAGAIN and
        the frames stay SEND_REQUEST: `tx_pending` then stays too, so the next kick (the packet loop
        kicks while idle) sends them, rather than leaving them in the ring until more traffic comes.
        ENOBUFS is the same for us: the device dropped a frame at once (a veth whose peer's backlog is
        full), and tpacket_snd() put that frame back to SEND_REQUEST and stopped there."""
        if not self.tx_pending:
            return
        try:
            self.sock.send(b"", socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return
            raise
        self.tx_pending = 0

    # -- misc -------------------------------------------------------------------------------------

    def statistics(self) -> tuple[int, int, int]:
        """(packets, drops, freeze_q_cnt) since the last call (the kernel resets them on read)."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, TPACKET_STATS_V3.size)
        return TPACKET_STATS_V3.unpack(raw)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self._drop_views()
        try:
            self.map.close()
        except (AttributeError, BufferError, ValueError):
            pass  # not mapped yet, or a view of it is still alive (the socket's close unmaps nothing)
        self.sock.close()

    def __enter__(self) -> PacketRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
