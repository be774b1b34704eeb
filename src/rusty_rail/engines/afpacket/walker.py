"""The ring walker: the one code that takes frames out of the RX ring and puts forwards into the TX ring.

    walker = RingWalker(ring, process, spill)
    walker.step(now)      # one RX block: its frames -> process(frames, now) -> the TX ring; -1 if none

The seam is `BlockProcessor`: the frames of one RX block in, the frames to transmit out, in order. The
engine's processor is `decide_blocks(balancer)` (core.Balancer.decide per frame); a vectorised one that
works on a whole block at once plugs in at the same place, and tests plug in stand-ins.

Per-packet code is hand-written loops over locals, on purpose: at 100 kpps every attribute lookup or
method call per packet costs a few percent of a CPU. Everything per block (kicks, counters, releasing the
block) goes through the ring's methods.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from rusty_rail.core.verdict import Action
from rusty_rail.engines.afpacket.ring import (
    TP_STATUS_AVAILABLE,
    TP_STATUS_SEND_REQUEST,
    TP_STATUS_VLAN_VALID,
    TP_STATUS_WRONG_FORMAT,
    TPACKET3_HDR,
    TPACKET3_HDRLEN,
    TX_FIELDS,
    TX_FIELDS_OFF,
    TX_STATUS,
    TX_STATUS_OFF,
    PacketRing,
)

if TYPE_CHECKING:
    from rusty_rail.core.balancer import Balancer

BlockProcessor = Callable[[list[bytes], float], list[bytes]]
"""One RX block's frames (ring order, VLAN-tagged ones left out) and the time -> frames to transmit."""

ProcessorFactory = Callable[["Balancer"], BlockProcessor]
"""Builds a worker's processor from its balancer (called in the worker, after any fork)."""


def decide_blocks(balancer: Balancer) -> BlockProcessor:
    """The engine's processor: the balancer's verdict per frame (docs/WIRE.md); forwards are sent, in
    order. Drops and passes need nothing from the engine: the balancer counted them, and a passed frame
    is the host stack's own copy."""
    # Typed loosely: a verdict is told by its action (one attribute) rather than by isinstance(), so
    # the checker cannot see that a FORWARD verdict has a frame.
    decide: Callable[[bytes, float], Any] = balancer.decide
    forward = Action.FORWARD

    def process(frames: list[bytes], now: float) -> list[bytes]:
        # A comprehension, the fastest per-frame loop Python has; `is`: verdicts carry the enum member.
        return [v.frame for frame in frames if (v := decide(frame, now)).action is forward]

    return process


@dataclass
class RingStats:
    """What the walker counts (the balancer keeps the verdict counters)."""

    rx_packets: int = 0
    """Frames taken from the RX ring (VLAN-tagged ones included)."""
    rx_blocks: int = 0
    rx_vlan_skipped: int = 0
    """Frames whose tag the kernel moved into metadata: not ours (WIRE.md section 1); the socket filter
    keeps them out unless the ring was opened without it."""
    rx_kernel_drops: int = 0
    """Frames the kernel could not put into the RX ring (it was full: we were too slow)."""
    tx_ring: int = 0
    """Forwards written into the TX ring."""
    tx_spilled: int = 0
    """Forwards sent with a plain send() because their TX slot was still held by an skb (or too small)."""
    tx_failed: int = 0
    """Forwards neither the ring nor the spill socket took (counted as TX_FAILED drops too)."""

    def figures(self) -> dict[str, int]:
        return asdict(self)


class RingWalker:
    """Walks one PacketRing: RX blocks in order, each through `process`, its forwards into the TX ring.

    `spill` is a ring-less AF_PACKET socket bound to the same device (a socket with a TX ring cannot do
    plain sends) for forwards whose TX slot is busy; `on_tx_failed` hears each forward that could not be
    sent at all (the engine counts it as a TX_FAILED drop)."""

    def __init__(
        self,
        ring: PacketRing,
        process: BlockProcessor,
        spill: socket.socket | None = None,
        on_tx_failed: Callable[[], None] | None = None,
        stats: RingStats | None = None,
    ) -> None:
        self.ring = ring
        self.process = process
        self.spill = spill
        self.on_tx_failed = on_tx_failed
        self.stats = stats if stats is not None else RingStats()

    def step(self, now: float) -> int:
        """Handle the next RX block if the kernel has retired one: the number of frames it held, else -1."""
        ring = self.ring
        block = ring.next_block()
        if block is None:
            return -1
        base, num, first = block
        frames = self.rx_frames(base + first, num)
        out = self.process(frames, now)
        if out:
            self.transmit(out)
        ring.release_block(base)  # frames are copies (bytes), so the block can go back now
        stats = self.stats
        stats.rx_packets += num
        stats.rx_blocks += 1
        return num

    def rx_frames(self, offset: int, count: int) -> list[bytes]:
        """The `count` frames of a block, from its first packet at `offset`, VLAN-tagged ones left out."""
        # Hand-written per packet (hot path): one struct unpack and one slice (a copy out of the mmap).
        m = self.ring.map
        header = TPACKET3_HDR.unpack_from
        vlan = TP_STATUS_VLAN_VALID
        frames: list[bytes] = []
        append = frames.append
        skipped = 0
        for _ in range(count):
            next_offset, snaplen, status, mac = header(m, offset)
            if status & vlan:
                skipped += 1
            else:
                start = offset + mac
                append(m[start : start + snaplen])
            offset += next_offset
        if skipped:
            self.stats.rx_vlan_skipped += skipped
        return frames

    def transmit(self, frames: list[bytes]) -> None:
        """Queue `frames` in the TX ring in order, kicking whenever half the ring is pending and once at
        the end; a frame whose slot is still in flight (or that does not fit a slot) is spilled."""
        ring = self.ring
        m = ring.map
        status_of = TX_STATUS.unpack_from
        fields_into = TX_FIELDS.pack_into
        base = ring.tx_base
        frame_size = ring.tx_frame_size
        slots = ring.tx_frames
        max_len = ring.tx_max_len
        kick_at = ring.tx_kick_at
        available, wrong_format, send_request = TP_STATUS_AVAILABLE, TP_STATUS_WRONG_FORMAT, TP_STATUS_SEND_REQUEST
        index = ring.tx_index
        pending = ring.tx_pending
        queued = 0
        # Hand-written per packet (hot path): the slot's status, one copy into the ring, one header write.
        for frame in frames:
            n = len(frame)
            slot = base + index * frame_size
            status = status_of(m, slot + TX_STATUS_OFF)[0]
            if n <= max_len and (status == available or status == wrong_format):
                data = slot + TPACKET3_HDRLEN
                m[data : data + n] = frame
                fields_into(m, slot + TX_FIELDS_OFF, n, n, send_request)
                index += 1
                if index == slots:
                    index = 0
                pending += 1
                queued += 1
                if pending >= kick_at:  # never more than half the ring un-kicked (ring.py)
                    ring.tx_index, ring.tx_pending = index, pending
                    ring.tx_kick()
                    pending = ring.tx_pending  # 0, unless the kernel refused (EAGAIN): then kick again
            else:
                self._spill(frame)
        ring.tx_index, ring.tx_pending = index, pending
        ring.tx_kick()
        self.stats.tx_ring += queued

    def _spill(self, frame: bytes) -> None:
        if self.spill is not None:
            try:
                self.spill.send(frame, socket.MSG_DONTWAIT)
            except OSError:
                pass
            else:
                self.stats.tx_spilled += 1
                return
        self.stats.tx_failed += 1
        if self.on_tx_failed is not None:
            self.on_tx_failed()
