from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rusty_rail.core.conntrack import ConnectionTable, Timeouts
from tests.oracle import oracle_key


def tcp(n: int) -> bytes:
    return oracle_key("10.0.0.1", "10.1.0.1", 6, n, 80)


def udp(n: int) -> bytes:
    return oracle_key("10.0.0.1", "10.1.0.1", 17, n, 53)


def test_lru_eviction_keeps_recently_used() -> None:
    table = ConnectionTable(capacity=3)
    for i in range(3):
        table.insert(tcp(i), 100 + i, now=0)
    assert table.lookup(tcp(0), now=1) == 100  # 0 is now the most recent
    table.insert(tcp(3), 103, now=2)
    assert tcp(1) not in table and tcp(0) in table and len(table) == 3
    assert table.evictions == 1


def test_idle_timeouts_per_protocol() -> None:
    table = ConnectionTable(timeouts=Timeouts(tcp=100, udp=10, other=5))
    table.insert(tcp(1), 1, now=0)
    table.insert(udp(1), 2, now=0)
    assert table.lookup(udp(1), now=9.9) == 2  # refreshes to 19.9
    assert table.lookup(udp(1), now=19.9) is None
    assert table.lookup(tcp(1), now=99) == 1
    assert table.lookup(tcp(1), now=198) == 1
    assert table.lookup(tcp(1), now=298.5) is None
    assert table.expirations == 2


def test_ipv6_keys_share_the_table_with_their_own_timeouts() -> None:
    table = ConnectionTable(capacity=2, timeouts=Timeouts(tcp=100, udp=10, other=5))
    tcp6 = oracle_key("2001:db8::1", "2001:db8:1::1", 6, 1, 443)
    udp6 = oracle_key("2001:db8::1", "2001:db8:1::1", 17, 1, 53)
    table.insert(tcp6, 1 << 100, now=0)
    table.insert(udp6, 2, now=0)
    assert table.ipv6 == 2
    assert table.lookup(udp6, now=11) is None and table.lookup(tcp6, now=99) == 1 << 100
    table.insert(tcp(1), 3, now=99)
    assert table.ipv6 == 1
    table.insert(tcp(2), 4, now=99)  # full: the least recently used goes, whatever its family
    assert tcp6 not in table and table.evictions == 1 and table.ipv6 == 0


def test_expire_sweeps_idle_entries() -> None:
    table = ConnectionTable(timeouts=Timeouts(tcp=10, udp=10, other=10))
    for i in range(50):
        table.insert(tcp(i), i, now=i)
    assert table.expire(now=30) == 21
    assert len(table) == 29


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 5)), max_size=300), st.integers(1, 20))
def test_never_exceeds_capacity_and_returns_what_was_inserted(ops, capacity: int) -> None:
    table = ConnectionTable(capacity=capacity)
    model: dict[bytes, int] = {}
    for now, (flow, backend) in enumerate(ops):
        key = tcp(flow)
        got = table.lookup(key, now)
        assert got is None or got == model[key]
        table.insert(key, backend, now)
        model[key] = backend
        assert len(table) <= capacity


def one_at_a_time(table: ConnectionTable, keys: list[bytes], proposed: list[int], listed: list[frozenset[int]],
                  now: float) -> list[int]:
    """What Balancer.decide does per packet (docs/WIRE.md section 7, steps 1-2)."""
    chosen = []
    for key, backend, backends in zip(keys, proposed, listed):
        found = table.lookup(key, now)
        if found is None or found not in backends:
            table.insert(key, backend, now)
            found = backend
        chosen.append(found)
    return chosen


@given(st.lists(st.lists(st.tuples(st.integers(0, 30), st.sampled_from([6, 17, 1]), st.integers(1, 4),
                                   st.booleans(), st.booleans(), st.integers(1, 3)), max_size=40), max_size=12),
       st.integers(1, 12))
def test_choose_many_leaves_the_table_as_one_at_a_time(blocks, capacity: int) -> None:
    """Repeated keys in a block (also back to back, with one backend set object per pool as the engine
    passes them), evictions from a small table, timeouts between blocks, backends that left, keys of
    both lengths (16 and 40 bytes): every choice, the entries in LRU order with their deadlines, and
    every other attribute of the table (its figures) agree."""
    timeouts = Timeouts(tcp=7, udp=3, other=2)
    batch, single = ConnectionTable(capacity, timeouts), ConnectionTable(capacity, timeouts)
    pools: dict[frozenset[int], frozenset[int]] = {}
    for now, ops in enumerate(blocks):
        ops = [op for op in ops for _ in range(op[-1])]  # each op 1-3 times in a row
        keys = [oracle_key("10.0.0.1", "10.1.0.1", proto, flow, 80) + (bytes(24) if long else b"")
                for flow, proto, _, _, long, _ in ops]
        proposed = [backend for _, _, backend, _, _, _ in ops]
        listed = [pools.setdefault(s, s) for s in
                  (frozenset({1, 2, 3, 4} if all_listed else {backend}) for _, _, backend, all_listed, _, _ in ops)]
        assert batch.choose_many(keys, proposed, listed, now) == one_at_a_time(single, keys, proposed, listed, now)
        assert list(batch._entries.items()) == list(single._entries.items())
        assert {k: v for k, v in vars(batch).items() if k != "_entries"} == \
            {k: v for k, v in vars(single).items() if k != "_entries"}
