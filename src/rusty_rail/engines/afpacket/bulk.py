"""The AF_PACKET engine's block processor: the common case of a whole RX block as numpy arrays, everything
else frame by frame through Balancer.decide, with the same result to the byte and to the counter.

The common case (docs/WIRE.md sections 1-8 with every check passing the plain way): an untagged Ethernet
frame | IPv4 with IHL 5, a valid checksum, not a fragment | GRE with no flags, protocol 0x0800 | inner
IPv4 with IHL 5, not a fragment, TCP or UDP, its ports present | of a service whose backends are IPv4 and
at least one has slots. For those rows of the block:

- parse: the first 64 bytes of every frame as one (N, 64) array, gathered in one step; the fixed fields
  are checked as masked 8-byte words, lengths and the outer checksum as columns;
- flow keys (16 bytes) and their murmur3 hashes as arrays (core.flowhash.flow_hashes);
- the service: ServiceMatcher's rule once per distinct (VIP, port, protocol) of the block;
- the Maglev slots as one gather per service, from the table's own slot array;
- the connection table in one call per run of rows (ConnectionTable.choose_many: lookup then insert
  per key, in order: the only per-packet Python left, and the table's rules stay in core/conntrack.py);
- the output: the outer Ethernet | IPv4 | GRE headers (38 bytes, as long as the input's) as an (N, 38)
  array, their checksums summed by columns; the walker copies each inner packet from the RX block
  straight into the TX ring behind its header (walker.Forwards);
- counters: forwarded, NO_SERVICE and NO_NEIGHBOUR drops, packets and bytes per (service, backend),
  added per group.

Everything else (frames to pass to the host, drops with their reasons, GRE options, IP options,
fragments, ICMP, services without slots, services whose options change the decision (hash fields, no
connection table, QUIC: docs/WIRE.md section 11), outputs longer than the lowest MTU toward a backend
(section 8b), IPv6) is decided by Balancer.decide, frame by frame; so are
calls of fewer than `bulk_from` frames (BULK_FROM), where the arrays' cost per call is more than
decide() per frame: at low rates, when a block holds what the block timeout (ring.py) gathered. Order: the
connection table sees the block's packets in their order (bulk runs and per-frame decisions
interleaved), and the outputs keep the block's order, so no two frames of a flow swap places.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rusty_rail.core.balancer import Balancer
from rusty_rail.core.flowhash import flow_hashes
from rusty_rail.core.service import Pool
from rusty_rail.core.verdict import Action, DropReason
from rusty_rail.engines.afpacket.walker import BlockProcessor, Forwards, Output, RxBlock, decide_blocks

BULK_FROM = 48
"""Frames in a call from which the arrays cost less than decide() per frame. Measured with
bench/afpacket_costs.py's walker (RX, processor, TX; random flows, a full table), per frame: decide()
16 us in calls of one frame, 5.3 us in calls of 16, 4.8-5.1 us in calls of 32 and 64; the arrays 165,
11.3, 6.3-6.7 and 3.8-4.6 us. Below this many frames, a call goes through decide()."""

PARSED = 64
"""Bytes of each frame read as an array: Ethernet 14 + IPv4 20 + GRE 4 + IPv4 20 + ports 4 = 62, rounded
up to whole 8-byte words (frames of the common case are at least 62 long; the 2 bytes after are unused)."""
OUT_HEADER = 38
"""Ethernet 14 + IPv4 20 + GRE 4 (docs/WIRE.md section 8): as long as the input's in the common case,
so the inner packet keeps its offset."""
_INNER_AT = 38
_IPV4_MAX = 1 << 32
_VIP_AND_DPORT = np.uint64(0xFFFFFFFF_0000FFFF)
_GRE, _TCP, _UDP = 47, 6, 17

_FIXED = {  # frame offset: (bits that must match, their value), docs/WIRE.md sections 1-5
    12: (0xFF, 0x08), 13: (0xFF, 0x00),  # EtherType IPv4, untagged
    14: (0xFF, 0x45),  # version 4, IHL 5 (options: per frame)
    20: (0x3F, 0x00), 21: (0xFF, 0x00),  # MF clear, fragment offset 0
    23: (0xFF, _GRE),
    34: (0xFF, 0x00), 35: (0xFF, 0x00),  # GRE: no flags, version 0 (RFC 2784; RFC 2890 fields: per frame)
    36: (0xFF, 0x08), 37: (0xFF, 0x00),  # GRE protocol IPv4
    38: (0xFF, 0x45),  # inner version 4, IHL 5 (options: per frame)
    44: (0x3F, 0x00), 45: (0xFF, 0x00),  # inner MF clear, fragment offset 0
}


def _word_checks(fixed: dict[int, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """`fixed` as (mask, value) per little-endian 8-byte word of the PARSED bytes: a row passes every
    check when `words & mask == value` in each of its words."""
    mask, value = np.zeros(PARSED // 8, dtype=np.uint64), np.zeros(PARSED // 8, dtype=np.uint64)
    for at, (bits, want) in fixed.items():
        shift = np.uint64(8 * (at % 8))
        mask[at // 8] |= np.uint64(bits) << shift
        value[at // 8] |= np.uint64(want) << shift
    return mask, value


_MASK, _VALUE = _word_checks(_FIXED)
_ALL_BYTES = np.uint64(0x0101010101010101)  # a row of 8 True bools, read as one word
_WORD_WEIGHTS = np.tile(np.array([256, 1], dtype=np.float32), 10)
"""An IPv4 header's bytes times these: the sum of its ten big-endian 16-bit words, as one matrix-vector
product (3x faster than summing a byte-swapped view). Exact in float32: at most 10 * 65535 < 2**24."""


def _word_sums(headers: np.ndarray) -> np.ndarray:
    """The sum of the ten 16-bit words (big-endian) of each row of `headers` (20 bytes each), as int64."""
    return (headers.astype(np.float32) @ _WORD_WEIGHTS).astype(np.int64)


def common_case(h: np.ndarray, lengths: np.ndarray, mtu: int = 1 << 16) -> np.ndarray:
    """Rows of `h` (the first PARSED bytes of each frame, C-contiguous; `lengths`: the frames' lengths)
    that pass every check of docs/WIRE.md sections 1-5 the plain way (module docstring), and whose output
    fits `mtu` (the lowest MTU toward any backend: a longer one is section 8b's, decided by decide()):
    the frames of the array path."""
    be16 = h.view(">u2")
    ok = ((h.view("<u8") & _MASK) == _VALUE).view("<u8")[:, 0] == _ALL_BYTES  # all 8 words match
    ok &= (h[:, 47] == _TCP) | (h[:, 47] == _UDP)
    outer_total = be16[:, 8].astype(np.int64)
    inner_total = be16[:, 20].astype(np.int64)
    # GRE 4 + inner IPv4 20 + ports 4 in the inner total length; everything within the frame.
    ok &= (outer_total <= lengths - 14) & (inner_total >= 24) & (inner_total <= outer_total - 24)
    ok &= inner_total <= mtu - 24
    # The outer header's one's complement sum (RFC 1071) is all ones exactly when the sum of its ten
    # 16-bit words is a non-zero multiple of 0xFFFF (core/checksum.py).
    header_sum = _word_sums(h[:, 14:34])
    ok &= (header_sum % 0xFFFF == 0) & (header_sum != 0)
    return ok


def ip_checksums(headers: np.ndarray) -> np.ndarray:
    """The IPv4 header checksum (RFC 1071) of each row of `headers` (20 bytes each, checksum field 0)."""
    total = _word_sums(headers)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class BulkProcessor:
    """A BlockProcessor over one worker's Balancer (the module docstring says what it does)."""

    def __init__(self, balancer: Balancer, bulk_from: int = BULK_FROM) -> None:
        self.balancer = balancer
        self.bulk_from = bulk_from
        self._per_frame = decide_blocks(balancer)
        self._decide: Callable[[bytes, float], Any] = balancer.decide
        self._tables: dict[int, tuple[Pool, np.ndarray | None]] = {}
        """id(pool) -> (pool, slot -> backend address as int64; None when a backend is IPv6)."""
        self._templates: dict[int, tuple[bytes, np.ndarray]] = {}
        """backend -> (its next hop's MAC, its 38 output header bytes without TOS, length and checksum)."""
        self.bulk_frames = 0
        """Frames the array path decided (the rest went through decide())."""

    # -- per block -----------------------------------------------------------------------------------

    def __call__(self, block: RxBlock, now: float) -> Sequence[Output]:
        if len(block) < self.bulk_from:
            return self._per_frame(block, now)
        h = block.ring.window(PARSED)[block.starts]
        common = common_case(h, block.lengths, self.balancer.min_mtu)
        rows = np.flatnonzero(common)
        pools, pool_of = self._services(h[rows])
        # Per row of `rows`: its pool's index in `pools`; -1: no service; -2: decided frame by frame.
        unserved = pool_of == -1
        if unserved.any():
            self.balancer.drops[DropReason.NO_SERVICE] += int(unserved.sum())
        bulk = pool_of >= 0
        one_by_one = np.ones(len(block), dtype=bool)
        one_by_one[rows] = False
        one_by_one[rows[pool_of == -2]] = True
        rows, pool_of = rows[bulk], pool_of[bulk]
        h = h[rows]

        keys = np.zeros((len(rows), 16), dtype=np.uint8)
        keys[:, :12] = h[:, 50:62]
        keys[:, 12] = h[:, 47]
        proposed = self._maglev(pools, pool_of, flow_hashes(keys, self.balancer.hash_seed))
        chosen, decided = self._choose(block, keys, proposed, pools, pool_of, rows, np.flatnonzero(one_by_one), now)
        self.bulk_frames += len(rows)
        return self._outputs(block, h, rows, pools, pool_of, chosen, decided)

    def _services(self, h: np.ndarray) -> tuple[list[Pool], np.ndarray]:
        """The service of each row by ServiceMatcher's rule, asked once per distinct (VIP, port, protocol,
        ports both zero) of the block: its pools, and each row's pool index (-1: none matched; -2: a
        pool the array path does not serve)."""
        pool_of = np.full(len(h), -1, dtype=np.int64)
        if not len(h):
            return [], pool_of
        # The inner destination and ports (bytes 54-61) as one number: vip << 32 | sport << 16 | dport.
        where = np.ascontiguousarray(h[:, 54:62]).view(">u8")[:, 0].astype(np.uint64)
        proto = h[:, 47]
        to = where & _VIP_AND_DPORT
        if (to == to[0]).all() and (proto == proto[0]).all() and to[0] & 0xFFFF:
            # One service's traffic, ports never both zero: one question, no sort.
            distinct, first, inverse = to[:1], np.zeros(1, np.int64), np.zeros(len(h), np.int64)
        else:  # vip (32 bits) | dport (16) | protocol (8) | ports both zero (1)
            matched = (((where >> 32) << 25) | ((where & 0xFFFF) << 9) | (proto.astype(np.uint64) << 1)
                       | ((where & 0xFFFFFFFF) == 0))
            distinct, first, inverse = np.unique(matched, return_index=True, return_inverse=True)
        pools: list[Pool] = []
        index_of: dict[int, int] = {}
        answers = np.empty(len(distinct), dtype=np.int64)
        for i, row in enumerate(first.tolist()):
            key = h[row, 50:62].tobytes() + bytes((int(h[row, 47]), 0, 0, 0))
            pool = self.balancer.pool_for(key)
            if pool is None:
                answers[i] = -1
            elif not pool.plain or not pool.slot_backend or self._table(pool) is None:
                # Options that change the decision (docs/WIRE.md section 11), NO_BACKEND unless a
                # connection entry remains, or IPv6 backends: decide() decides.
                answers[i] = -2
            else:
                index = index_of.get(id(pool))
                if index is None:
                    index = index_of[id(pool)] = len(pools)
                    pools.append(pool)
                answers[i] = index
        return pools, answers[inverse.reshape(-1)]

    def _table(self, pool: Pool) -> np.ndarray | None:
        """The pool's slots as backend addresses (an array), made once per pool."""
        cached = self._tables.get(id(pool))
        if cached is not None and cached[0] is pool:
            return cached[1]
        if len(self._tables) > 2 * len(self.balancer.services):
            self._tables.clear()  # pools of services since replaced
        table = pool.service.table
        addresses = [int(b) for b in table.backends]
        slots = (np.array(addresses, dtype=np.int64)[table.slots]
                 if all(a < _IPV4_MAX for a in addresses) else None)
        self._tables[id(pool)] = (pool, slots)
        return slots

    def _maglev(self, pools: list[Pool], pool_of: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """Each row's Maglev backend: its pool's slot `hash % M` (docs/WIRE.md sections 6, 7)."""
        proposed = np.empty(len(pool_of), dtype=np.int64)
        hashes = hashes.astype(np.int64)
        for p, pool in enumerate(pools):
            slots = self._table(pool)
            assert slots is not None
            mine = pool_of == p if len(pools) > 1 else slice(None)
            proposed[mine] = slots[hashes[mine] % len(slots)]
        return proposed

    def _choose(self, block: RxBlock, keys: np.ndarray, proposed: np.ndarray, pools: list[Pool],
                pool_of: np.ndarray, rows: np.ndarray, per_frame: np.ndarray,
                now: float) -> tuple[list[int], dict[int, bytes]]:
        """The connection table's choice for the bulk rows, with the per-frame rows decided in between,
        in block order: (each bulk row's backend, per-frame row -> its forwarded frame)."""
        key_list = keys.view("V16")[:, 0].tolist()  # bytes objects, made in C (slicing costs 4x as much)
        backend_sets = [pool.backend_set for pool in pools]
        listed = ([backend_sets[0]] * len(rows) if len(pools) == 1
                  else [backend_sets[p] for p in pool_of.tolist()])
        wanted = proposed.tolist()
        choose = self.balancer.connections.choose_many
        if not len(per_frame):
            return choose(key_list, wanted, listed, now), {}
        chosen: list[int] = []
        decided: dict[int, bytes] = {}
        decide, forward, reply, m = self._decide, Action.FORWARD, Action.REPLY, block.ring.map
        done = 0
        for row, before in zip(per_frame.tolist(), np.searchsorted(rows, per_frame).tolist()):
            if before > done:
                chosen += choose(key_list[done:before], wanted[done:before], listed[done:before], now)
                done = before
            start = int(block.starts[row])
            verdict = decide(m[start : start + int(block.lengths[row])], now)
            if verdict.action is forward or verdict.action is reply:  # a reply: the balancer's answer
                decided[row] = verdict.frame
        if done < len(rows):
            chosen += choose(key_list[done:], wanted[done:], listed[done:], now)
        return chosen, decided

    def _outputs(self, block: RxBlock, h: np.ndarray, rows: np.ndarray, pools: list[Pool], pool_of: np.ndarray,
                 chosen: list[int], decided: dict[int, bytes]) -> list[Output]:
        """Count the bulk rows' forwards and drops, build their headers, and put every output in block order."""
        balancer = self.balancer
        backends = np.array(chosen, dtype=np.int64)
        distinct, which = np.unique(backends, return_inverse=True)
        which = which.reshape(-1)
        templates = np.zeros((len(distinct), OUT_HEADER), dtype=np.uint8)
        known = np.zeros(len(distinct), dtype=bool)
        macs = balancer.neighbours
        for i, backend in enumerate(distinct.tolist()):
            mac = macs.get(backend)
            if mac is not None:
                templates[i] = self._template(backend, mac)
                known[i] = True
        if not known.all():
            sent = known[which]
            balancer.drops[DropReason.NO_NEIGHBOUR] += len(rows) - int(sent.sum())
            rows, h, pool_of, backends, which = rows[sent], h[sent], pool_of[sent], backends[sent], which[sent]
        inner_total = h.view(">u2")[:, 20].astype(np.int64)
        self._count(pools, pool_of, backends, distinct, which, inner_total)

        headers = templates[which]
        headers[:, 15] = h[:, 39]  # TOS: the inner packet's
        fields = headers.view(">u2")
        fields[:, 8] = inner_total + 24  # total length
        fields[:, 12] = ip_checksums(headers[:, 14:34])
        forwards = Forwards(headers, block.starts[rows] + _INNER_AT, inner_total)
        if not decided:
            return [forwards] if len(rows) else []
        # Each per-frame forward goes between the bulk forwards of the rows before and after it.
        outputs: list[Output] = []
        done = 0
        for row, before in zip(decided, np.searchsorted(rows, list(decided)).tolist()):
            if before > done:
                outputs.append(Forwards(headers[done:before], forwards.payload_at[done:before],
                                        inner_total[done:before]))
                done = before
            outputs.append(decided[row])
        if done < len(rows):
            outputs.append(Forwards(headers[done:], forwards.payload_at[done:], inner_total[done:]))
        return outputs

    def _template(self, backend: int, mac: bytes) -> np.ndarray:
        """docs/WIRE.md section 8 for one backend: every header byte but TOS, total length and checksum."""
        cached = self._templates.get(backend)
        if cached is not None and cached[0] == mac:
            return cached[1]
        balancer = self.balancer
        header = (mac + balancer.local_mac + b"\x08\x00"
                  + bytes((0x45, 0, 0, 0, 0, 0, 0x40, 0x00, 64, _GRE, 0, 0))
                  + balancer.local_address.packed + backend.to_bytes(4, "big")
                  + b"\x00\x00\x08\x00")
        template = np.frombuffer(header, dtype=np.uint8)
        self._templates[backend] = (mac, template)
        return template

    def _count(self, pools: list[Pool], pool_of: np.ndarray, backends: np.ndarray, distinct: np.ndarray,
               which: np.ndarray, inner_total: np.ndarray) -> None:
        """forwarded, and packets and inner bytes per (service, backend), as decide() counts them;
        `which`: each row's backend in `distinct` (its group, when there is one pool)."""
        if not len(backends):
            return
        self.balancer.forwarded += len(backends)
        if len(pools) > 1:
            groups, which = np.unique(pool_of * _IPV4_MAX + backends, return_inverse=True)
            which = which.reshape(-1)
            keys = [(pools[g // _IPV4_MAX], g % _IPV4_MAX) for g in groups.tolist()]
        else:
            keys = [(pools[0], b) for b in distinct.tolist()]
        packets = np.bincount(which, minlength=len(keys)).tolist()
        sizes = np.bincount(which, weights=inner_total, minlength=len(keys)).tolist()
        for (pool, backend), n, size in zip(keys, packets, sizes):
            if n:
                pool.packets[backend] += n
                pool.bytes[backend] += int(size)


def bulk_blocks(balancer: Balancer) -> BlockProcessor:
    """The engine's processor (walker.py's seam)."""
    return BulkProcessor(balancer)
