"""PacketRing's layout in anonymous memory, with the kernel's side played in Python: no socket, no root.

`fill(frames)` writes an RX block as the kernel does (block descriptor, tpacket3_hdr per frame, the frame
at tp_mac, the block handed to user space); `tx_kick()` sends what the walker queued the way the kernel
walks the TX ring (from its own index, every SEND_REQUEST slot in turn, each AVAILABLE again after), and
keeps the frames in `sent`. The walker, the block processors and the benchmarks run on it unchanged.
"""

from __future__ import annotations

import mmap

from rusty_rail.engines.afpacket import ring as R

FIRST_PACKET = 48
"""offset_to_first_pkt: after the block descriptor."""
MAC_AT = 82
"""tp_mac as the kernel sets it for TPACKET_V3 (the network header 16-byte aligned: 80 + 2)."""


class MemoryRing(R.PacketRing):
    def __init__(self, rx_blocks: int = 4, rx_block_size: int = 1 << 17, tx_frames: int = 256,
                 tx_frame_size: int = 2048) -> None:
        self.rx_block_size, self.rx_blocks, self.rx_index = rx_block_size, rx_blocks, 0
        self.rx_size = rx_block_size * rx_blocks
        self.tx_frame_size, self.tx_frames = tx_frame_size, tx_frames
        self.tx_size = tx_frame_size * tx_frames
        self.tx_base = self.rx_size
        self.tx_max_len = tx_frame_size - R.TPACKET3_HDRLEN
        self.tx_index = self.tx_pending = 0
        self.tx_kick_at = max(1, tx_frames // 2)
        self.map = mmap.mmap(-1, self.rx_size + self.tx_size)
        self._views()
        self.fill_index = 0
        self.kernel_tx_index = 0
        self.sent: list[bytes] = []
        self.kicks = 0
        self.sock = None  # type: ignore[assignment]

    def fill(self, frames: list[bytes], vlan: frozenset[int] = frozenset()) -> None:
        """The next RX block, holding `frames` (those whose index is in `vlan` flagged VLAN-tagged)."""
        base = self.fill_index * self.rx_block_size
        m = self.map
        assert R.BLOCK_DESC.unpack_from(m, base)[0] == R.TP_STATUS_KERNEL, "the walker still holds this block"
        offset = base + FIRST_PACKET
        for i, frame in enumerate(frames):
            step = (MAC_AT + len(frame) + 15) & ~15
            assert offset + step <= base + self.rx_block_size, "more frames than the block holds"
            status = R.TP_STATUS_USER | (R.TP_STATUS_VLAN_VALID if i in vlan else 0)
            R.TPACKET3_HDR.pack_into(m, offset, step if i + 1 < len(frames) else 0, len(frame), status, MAC_AT)
            m[offset + MAC_AT : offset + MAC_AT + len(frame)] = frame
            offset += step
        R.BLOCK_DESC.pack_into(m, base, R.TP_STATUS_USER, len(frames), FIRST_PACKET)
        self.fill_index = (self.fill_index + 1) % self.rx_blocks

    def tx_kick(self) -> None:
        self.kicks += 1
        m = self.map
        while True:
            slot = self.tx_base + self.kernel_tx_index * self.tx_frame_size
            if R.TX_STATUS.unpack_from(m, slot + R.TX_STATUS_OFF)[0] != R.TP_STATUS_SEND_REQUEST:
                break
            _, length, _ = R.TX_FIELDS.unpack_from(m, slot + R.TX_FIELDS_OFF)
            data = slot + R.TPACKET3_HDRLEN
            self.sent.append(m[data : data + length])
            R.TX_STATUS.pack_into(m, slot + R.TX_STATUS_OFF, R.TP_STATUS_AVAILABLE)
            self.kernel_tx_index = (self.kernel_tx_index + 1) % self.tx_frames
        self.tx_pending = 0

    def take_sent(self) -> list[bytes]:
        sent, self.sent = self.sent, []
        return sent

    def close(self) -> None:
        self._drop_views()
        self.map.close()
