"""The connection table: every rule about remembered flows lives in this file.

- Bounded: at most `capacity` entries; inserting into a full table evicts the least recently used.
- Idle timeouts per protocol: an entry not seen for its protocol's timeout is gone.
- An entry names its backend by address. Whether that backend may still be used is the caller's
  question (it knows the current backend set); a flow whose backend left is simply rewritten.
- Clock-free: every call takes `now` (seconds, any monotonic origin).

`choose_many` is the batch form for engines that work on many packets at once: lookup then insert per
packet, in order, so a block of packets leaves the table exactly as one packet at a time would (a test
holds it to the two).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import dataclass

from rusty_rail.core.constants import DEFAULT_CONN_CAPACITY
from rusty_rail.core.ipv4 import IpProtocol


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Idle timeouts in seconds."""

    tcp: float = 300.0
    udp: float = 60.0
    other: float = 30.0

    def for_protocol(self, protocol: int) -> float:
        if protocol == IpProtocol.TCP:
            return self.tcp
        if protocol == IpProtocol.UDP:
            return self.udp
        return self.other


class ConnectionTable:
    """Flow key (16 bytes for IPv4, 40 for IPv6: flow.py) -> backend address (int, either family:
    core/address.py), LRU-bounded, with idle timeouts. One table for both families."""

    def __init__(self, capacity: int = DEFAULT_CONN_CAPACITY, timeouts: Timeouts = Timeouts()) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.timeouts = timeouts
        # key -> [backend, expires_at]; a list so a hit updates in place without allocating.
        self._entries: OrderedDict[bytes, list] = OrderedDict()
        self._timeout_by_proto = {int(IpProtocol.TCP): timeouts.tcp, int(IpProtocol.UDP): timeouts.udp}
        self.evictions = 0
        self.expirations = 0
        self.ipv6 = 0
        """Entries whose key is an IPv6 flow's (40 bytes): figures per family."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def _timeout(self, key: bytes) -> float:
        # key[-4]: flow.PROTOCOL_FROM_END as a literal (a constant index, no global lookup per packet).
        return self._timeout_by_proto.get(key[-4], self.timeouts.other)

    def lookup(self, key: bytes, now: float) -> int | None:
        """The backend remembered for `key`, refreshing the entry; None when absent or idle too long."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry[1]:
            del self._entries[key]
            self.expirations += 1
            if len(key) != 16:
                self.ipv6 -= 1
            return None
        entry[1] = now + self._timeout(key)
        self._entries.move_to_end(key)
        return entry[0]

    def peek(self, key: bytes, now: float) -> int | None:
        """Like lookup, without refreshing or reordering (for inspection)."""
        entry = self._entries.get(key)
        if entry is None or now >= entry[1]:
            return None
        return entry[0]

    def insert(self, key: bytes, backend: int, now: float) -> None:
        """Remember `backend` for `key`, evicting the least recently used entry when full."""
        entries = self._entries
        if key in entries:
            entry = entries[key]
            entry[0] = backend
            entry[1] = now + self._timeout(key)
            entries.move_to_end(key)
            return
        if len(entries) >= self.capacity:
            if len(entries.popitem(last=False)[0]) != 16:
                self.ipv6 -= 1
            self.evictions += 1
        entries[key] = [backend, now + self._timeout(key)]
        if len(key) != 16:
            self.ipv6 += 1

    def choose_many(self, keys: Sequence[bytes], proposed: Sequence[int], listed: Sequence[Container[int]],
                    now: float) -> list[int]:
        """The backend of each key in turn: the one lookup() remembers when `listed[i]` (the flow's
        backends now) still has it; else `proposed[i]`, which insert() then remembers.

        Exactly lookup() then, when needed, insert() per key, in order: a key inserted early in the batch
        is found later in it, and an entry evicted early is missed later. Their steps are written out
        here rather than called: this loop runs once per packet of the AF_PACKET engine, and the two
        calls cost 15% of its CPU at 200 kpps (bench/engine_rates.py). tests/test_conntrack.py holds it
        to lookup() then insert(): every choice, the entries in LRU order with their deadlines, and
        every figure of the table."""
        entries = self._entries
        get, refresh, evict = entries.get, entries.move_to_end, entries.popitem
        # now + _timeout(key) for each protocol, added once per call (the same floats, no call per key).
        deadlines, other = {p: now + t for p, t in self._timeout_by_proto.items()}, now + self.timeouts.other
        capacity = self.capacity
        chosen: list[int] = []
        append = chosen.append
        ipv6 = 0  # the change to self.ipv6: IPv6 keys (not 16 bytes) added less those removed
        prev_key, prev_backends, prev = None, None, [0, now]
        for key, backend, backends in zip(keys, proposed, listed, strict=True):
            if key == prev_key and backends is prev_backends and now < prev[1] and prev[0] in backends:
                # The same flow as the packet before (a block of one flow holds runs of them): its entry
                # was just made or refreshed to this deadline, is the most recent, and holds a backend
                # of `backends`, so lookup() and insert() would change nothing.
                append(prev[0])
                continue
            entry = get(key)
            deadline = deadlines.get(key[-4], other)  # key[-4]: the protocol, as _timeout() reads it
            if entry is not None:
                if now < entry[1]:  # lookup(): a hit refreshes the entry
                    entry[1] = deadline
                    refresh(key)
                    if entry[0] not in backends:  # insert() over an entry: rewritten, no eviction
                        entry[0] = backend
                    append(entry[0])
                    prev_key, prev_backends, prev = key, backends, entry
                    continue
                del entries[key]  # lookup(): idle too long
                self.expirations += 1
                if len(key) != 16:
                    ipv6 -= 1
            if len(entries) >= capacity:  # insert(): a new entry, the least recently used one out
                if len(evict(last=False)[0]) != 16:
                    ipv6 -= 1
                self.evictions += 1
            entries[key] = prev = [backend, deadline]
            prev_key, prev_backends = key, backends
            if len(key) != 16:
                ipv6 += 1
            append(backend)
        self.ipv6 += ipv6
        return chosen

    def remove(self, key: bytes) -> None:
        if self._entries.pop(key, None) is not None and len(key) != 16:
            self.ipv6 -= 1

    def expire(self, now: float, limit: int = 1024) -> int:
        """Drop up to `limit` idle entries from the least recently used end; returns how many.

        Entries are in recency order, so idle ones gather at the front; an entry with a longer timeout
        at the front stops the sweep early, and lookup() still refuses anything past its time.
        """
        removed = 0
        entries = self._entries
        while entries and removed < limit:
            key, entry = next(iter(entries.items()))
            if now < entry[1]:
                break
            del entries[key]
            removed += 1
            if len(key) != 16:
                self.ipv6 -= 1
        self.expirations += removed
        return removed

    def items(self) -> list[tuple[bytes, int]]:
        return [(k, v[0]) for k, v in self._entries.items()]
