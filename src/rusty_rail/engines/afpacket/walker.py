"""The ring walker: the one code that takes frames out of the RX ring and puts forwards into the TX ring.

    walker = RingWalker(ring, process, spill)
    walker.step(now)      # the retired RX blocks: RxBlock -> process(block, now) -> the TX ring; -1 if none

The seam is `BlockProcessor`: RX frames in (`RxBlock`: where the frames of one or more retired blocks lie
in the ring, so a processor can read them as arrays without copying each out), the frames to transmit
out, in order. An output is either a frame (bytes) or `Forwards`, many frames built in bulk (a header
each, followed by bytes still in the RX ring); the walker writes them into the TX ring in the order
given, so no two frames of a flow swap places. The engine's processor is bulk.py's; `decide_blocks` is
core.Balancer.decide per frame, and `per_frame` lets a function of frame lists (tests' stand-ins,
benchmarks) plug in at the same place.

Per-packet code is hand-written loops over locals, on purpose: at 100 kpps every attribute lookup or
method call per packet costs a few percent of a CPU. Everything per call (kicks, counters, releasing the
blocks) goes through the ring's methods.
"""

from __future__ import annotations

import mmap
import socket
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from rusty_rail.core.verdict import Action
from rusty_rail.engines.afpacket.ring import (
    TP_STATUS_AVAILABLE,
    TP_STATUS_SEND_REQUEST,
    TP_STATUS_VLAN_VALID,
    TP_STATUS_WRONG_FORMAT,
    TPACKET3_HDRLEN,
    TX_FIELDS,
    TX_FIELDS_OFF,
    TX_STATUS,
    TX_STATUS_OFF,
    PacketRing,
)

if TYPE_CHECKING:
    from rusty_rail.core.balancer import Balancer

# tpacket3_hdr fields read or written for many frames at once, as 32-bit word indices (ring.py)
_SNAPLEN_WORD, _STATUS_WORD, _MAC_WORD = 12 // 4, 20 // 4, 24 // 4
_TX_SNAPLEN_WORD, _TX_LEN_WORD, _TX_STATUS_WORD = 12 // 4, 16 // 4, TX_STATUS_OFF // 4

BATCH_BLOCKS = 8
"""Retired RX blocks handed to the processor together, at most (see step())."""
RECTANGLE_MAX = 256
"""Forwards whose copied bytes are all this short are copied as one (frames x longest) rectangle by
numpy; longer ones too when the rectangle is mostly their own bytes (RECTANGLE_PADDING), else frame by
frame (a rectangle of 1500-byte rows for a call of short frames would copy mostly padding)."""
RECTANGLE_PADDING = 1.5
"""A rectangle of long rows is copied when it is at most this many times the frames' own bytes: bulk
TCP, whose segments are nearly all full-sized. Measured for 256 frames of 1476 bytes (one in seven
short), the copy alone: 250-420 ns a frame as a rectangle, 880-940 ns frame by frame."""
RECTANGLE_STEP = 64
"""Rectangle widths are rounded up to this: a few ring.window() views serve every block."""


@dataclass(frozen=True)
class RxBlock:
    """The frames of one or more retired RX blocks, where the kernel wrote them: frame i is the ring's
    bytes `starts[i]` to `starts[i] + lengths[i]` (VLAN-tagged frames left out). Valid until the walker
    gives the blocks back, i.e. for the duration of the processor's call."""

    ring: PacketRing
    starts: np.ndarray
    """int64 offsets into `ring.map` / `ring.u8`."""
    lengths: np.ndarray
    """int64 frame lengths (the kernel's snaplen: the whole frame)."""

    def __len__(self) -> int:
        return len(self.starts)

    def frames(self) -> list[bytes]:
        """Every frame copied out, in ring order."""
        m = self.ring.map
        return [m[s : s + n] for s, n in zip(self.starts.tolist(), self.lengths.tolist())]


@dataclass(frozen=True)
class Forwards:
    """Forwards built in bulk: frame i is `headers[i]` followed by the ring's bytes `payload_at[i]` to
    `payload_at[i] + payload_len[i]` (part of a frame of the block being processed)."""

    headers: np.ndarray
    """(K, H) uint8."""
    payload_at: np.ndarray
    """(K,) int64 offsets into the ring's mapping."""
    payload_len: np.ndarray
    """(K,) int64."""

    def __len__(self) -> int:
        return len(self.headers)

    def frame(self, m: mmap.mmap, i: int) -> bytes:
        at = int(self.payload_at[i])
        return self.headers[i].tobytes() + m[at : at + int(self.payload_len[i])]


Output = Union[bytes, Forwards]
BlockProcessor = Callable[[RxBlock, float], Sequence[Output]]
"""One RX block and the time -> what to transmit, in order."""

FrameProcessor = Callable[[list[bytes], float], list[bytes]]
"""One RX block's frames (copied out, ring order) and the time -> frames to transmit."""

ProcessorFactory = Callable[["Balancer"], BlockProcessor]
"""Builds a worker's processor from its balancer (called in the worker, after any fork)."""


def per_frame(process: FrameProcessor) -> BlockProcessor:
    """A BlockProcessor that hands `process` the block's frames as bytes."""
    return lambda block, now: process(block.frames(), now)


def decide_blocks(balancer: Balancer) -> BlockProcessor:
    """The balancer's verdict per frame (docs/WIRE.md); forwards and the balancer's own answers (Reply:
    echo replies, "too big", section 11) are sent, in order. Drops and passes need nothing from the
    engine: the balancer counted them, and a passed frame is the host stack's own copy."""
    # Typed loosely: a verdict is told by its action (one attribute) rather than by isinstance(), so
    # the checker cannot see that a FORWARD verdict has a frame.
    decide: Callable[[bytes, float], Any] = balancer.decide
    forward, reply = Action.FORWARD, Action.REPLY

    def process(frames: list[bytes], now: float) -> list[bytes]:
        # A comprehension, the fastest per-frame loop Python has; `is`: verdicts carry the enum member
        # (a forward pays one comparison, only other verdicts a second).
        return [v.frame for frame in frames if (a := (v := decide(frame, now)).action) is forward or a is reply]

    return per_frame(process)


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
        """Handle every RX block the kernel has retired (at most BATCH_BLOCKS) in one call to the processor:
        the number of frames they held, else -1. One block at a time while the walker keeps up; when it
        falls behind, the blocks waiting meanwhile go together, so a processor's cost per call is spread
        over more frames exactly when that matters."""
        ring = self.ring
        blocks = ring.ready_blocks(BATCH_BLOCKS)
        if not blocks:
            return -1
        out = self.process(self.rx_block(blocks), now)
        if out:
            self.send(out)
        for base, _, _ in blocks:  # after the TX writes: Forwards copy their bytes out of these blocks
            ring.release_block(base)
        frames = sum(num for _, num, _ in blocks)
        stats = self.stats
        stats.rx_packets += frames
        stats.rx_blocks += len(blocks)
        return frames

    def rx_block(self, blocks: list[tuple[int, int, int]]) -> RxBlock:
        """The frames of `blocks` ((block offset, packet count, first packet offset) each), in order."""
        ring = self.ring
        words = ring.words
        headers: list[int] = []
        append = headers.append
        # Hand-written per packet (hot path): each header says where the next one is, so this walk is
        # the one sequential part; everything else about the headers is read as arrays below.
        for base, count, first in blocks:
            offset = base + first
            for _ in range(count):
                append(offset)
                offset += words[offset >> 2]
        at = np.array(headers, dtype=np.int64)
        word = at >> 2
        lengths = ring.u32[word + _SNAPLEN_WORD].astype(np.int64)
        starts = at + (ring.u32[word + _MAC_WORD] & 0xFFFF)  # tp_mac: the low half (little-endian)
        tagged = ring.u32[word + _STATUS_WORD] & TP_STATUS_VLAN_VALID
        if tagged.any():
            untagged = tagged == 0
            self.stats.rx_vlan_skipped += len(at) - int(untagged.sum())
            starts, lengths = starts[untagged], lengths[untagged]
        return RxBlock(ring, starts, lengths)

    def send(self, out: Sequence[Output]) -> None:
        """Queue `out` in the TX ring in order and kick once at the end."""
        frames: list[bytes] = []
        for item in out:
            if item.__class__ is bytes:
                frames.append(item)  # type: ignore[arg-type]
                continue
            if frames:
                self._queue(frames)
                frames = []
            self._queue_forwards(item)  # type: ignore[arg-type]
        if frames:
            self._queue(frames)
        self.ring.tx_kick()

    def transmit(self, frames: list[bytes]) -> None:
        """Queue `frames` in the TX ring in order, kicking whenever half the ring is pending and once at
        the end; a frame whose slot is still in flight (or that does not fit a slot) is spilled."""
        self._queue(frames)
        self.ring.tx_kick()

    def _queue(self, frames: list[bytes]) -> None:
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
                ring.tx_index, ring.tx_pending = index, pending
                ring.tx_kick()  # what is queued goes first: the spill must not overtake it
                self._spill(frame)
                pending = ring.tx_pending
        ring.tx_index, ring.tx_pending = index, pending
        self.stats.tx_ring += queued

    def _queue_forwards(self, fw: Forwards) -> None:
        """Forwards into the TX ring as arrays, a run of free slots at a time (at most what may be pending
        before a kick); a frame whose slot is busy, or that does not fit one, is spilled."""
        ring = self.ring
        total = len(fw)
        width = fw.headers.shape[1]
        out_len = fw.payload_len + width
        fits = out_len <= ring.tx_max_len
        done = 0
        while done < total:
            chunk = min(total - done, max(1, ring.tx_kick_at - ring.tx_pending))
            slots = (ring.tx_index + np.arange(chunk)) % ring.tx_frames
            status = ring.tx_words[slots, _TX_STATUS_WORD]
            usable = ((status == TP_STATUS_AVAILABLE) | (status == TP_STATUS_WRONG_FORMAT)) & fits[done : done + chunk]
            if not usable.all():
                chunk = int(np.argmin(usable))  # the frames before the first unusable slot or frame
                if chunk == 0:
                    ring.tx_kick()  # what is queued goes first: the spill must not overtake it
                    self._spill(fw.frame(ring.map, done))
                    done += 1
                    continue
                slots = slots[:chunk]
            part = slice(done, done + chunk)
            ring.tx_slots[slots, TPACKET3_HDRLEN : TPACKET3_HDRLEN + width] = fw.headers[part]
            self._copy_payloads(slots, TPACKET3_HDRLEN + width, fw.payload_at[part], fw.payload_len[part])
            lengths = out_len[part]
            ring.tx_words[slots, _TX_SNAPLEN_WORD] = lengths
            ring.tx_words[slots, _TX_LEN_WORD] = lengths
            ring.tx_words[slots, _TX_STATUS_WORD] = TP_STATUS_SEND_REQUEST  # last: the frames are complete
            ring.tx_index = (ring.tx_index + chunk) % ring.tx_frames
            ring.tx_pending += chunk
            self.stats.tx_ring += chunk
            done += chunk
            if ring.tx_pending >= ring.tx_kick_at:
                ring.tx_kick()

    def _copy_payloads(self, slots: np.ndarray, into: int, at: np.ndarray, lengths: np.ndarray) -> None:
        """Copy `lengths[i]` bytes of the mapping from `at[i]` into TX slot `slots[i]` at offset `into`."""
        ring = self.ring
        longest = int(lengths.max())
        width = -(-longest // RECTANGLE_STEP) * RECTANGLE_STEP
        if width <= ring.tx_frame_size - into and (
                width <= RECTANGLE_MAX or width * len(lengths) <= RECTANGLE_PADDING * int(lengths.sum())):
            # One rectangle: each row copies `width` bytes; what lies past a frame's own length lands in
            # its TX slot after tp_len, where nothing reads it.
            ring.tx_slots[slots, into : into + width] = ring.window(width)[at]
            return
        m = ring.map
        to = ring.tx_base + slots * ring.tx_frame_size + into
        for d, s, n in zip(to.tolist(), at.tolist(), lengths.tolist()):
            m[d : d + n] = m[s : s + n]

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
