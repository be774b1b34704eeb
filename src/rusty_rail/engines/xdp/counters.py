"""The XDP program's figures as `rusty_rail.dataplane.Counters`.

- rr_stats (per CPU, summed): forwarded, passed, a counter per drop reason, and the engine's own
  conn_hit / conn_new / conn_insert;
- rr_backend_stats (per CPU, summed): packets and inner bytes per (service, backend), for the slots
  the map image says are in use (every backend listed now; one listed since the last sync shows 0, 0);
- rr_conns and rr_conns6: entries (of each family), and entries per (service, backend), from one
  BPF_MAP_LOOKUP_BATCH walk of each (the walk runs in the kernel, off the packet path; counting per
  backend is the Python side's cost, hence FLOW_COUNT_LIMIT; an entry's key names its service,
  ServiceMatcher.tally);
- connection evictions, derived: the kernel's LRU maps evict without counting (connection_evictions);
- tx_refused, from the device (engines/device.py): the program counts a frame forwarded when it returns
  XDP_TX, and the device may still refuse it (native mode on a veth whose peer runs no XDP program
  drops them all). `forwarded` is the program's figure (both families) less those.
"""

from __future__ import annotations

import ctypes
import struct
from collections import Counter

from rusty_rail.bpf import libbpf
from rusty_rail.core.address import Address, as_address
from rusty_rail.core.constants import FLOW_COUNT_LIMIT
from rusty_rail.core.service import ServiceKey, ServiceMatcher
from rusty_rail.core.verdict import DropReason
from rusty_rail.dataplane import Counters
from rusty_rail.engines.xdp import maps as m
from rusty_rail.engines.xdp.program import XdpProgram

__all__ = ["backend_figures", "connection_evictions", "connection_summary", "engine_figures", "read",
           "reset", "stats"]



def stats(program: XdpProgram) -> list[int]:
    """rr_stats summed over CPUs, by index (bpf/rr_structs.h)."""
    return [_stat(program, i) for i in range(m.STAT_MAX)]


def named(program: XdpProgram) -> dict[str, int]:
    """rr_stats by name: forwarded (both families), forwarded_ipv6, passed, drop_<reason>, conn_hit,
    conn_new, conn_insert."""
    values = stats(program)
    out = {name: values[i] for i, name in sorted(m.stat_names().items())}
    out["forwarded"] = out.pop("forwarded_ipv4") + out["forwarded_ipv6"]
    out.update(engine_figures(values))
    return out


def engine_figures(values: list[int]) -> dict[str, int]:
    """Counters.engine from rr_stats: conn_hit counts the hits a CPU's flow cache served
    (flow_cache_hit) as well as those rr_conns did."""
    out = {name: values[i] for i, name in m.ENGINE_STATS.items()}
    out["conn_hit"] += out["flow_cache_hit"]
    return out


def _stat(program: XdpProgram, index: int) -> int:
    raw = program.lookup(m.MAP_STATS, ctypes.c_uint32(index), 8 * program.ncpus)
    return sum(struct.unpack(f"={program.ncpus}Q", raw)) if raw is not None else 0


def backend_figures(program: XdpProgram) -> dict[tuple[ServiceKey, Address], tuple[int, int]]:
    """(packets, inner bytes) forwarded per (service, backend) listed now, summed over CPUs."""
    size = ctypes.sizeof(m.RrBackendStats) * program.ncpus
    out = {}
    for (s, b), (service, address) in program.image.stat_slots.items():
        raw = program.lookup(m.MAP_BACKEND_STATS, ctypes.c_uint32(m.backend_stats_slot(s, b)), size)
        values = struct.unpack(f"={2 * program.ncpus}Q", raw) if raw is not None else (0, 0)
        out[(service, as_address(address))] = (sum(values[0::2]), sum(values[1::2]))
    return out


def connection_summary(program: XdpProgram, flow_limit: int | None = None,
                       matcher: ServiceMatcher[ServiceKey] | None = None
                       ) -> tuple[int, dict[tuple[ServiceKey, Address], int] | None]:
    """(entries in rr_conns and rr_conns6, entries per (service, backend address)), in one
    BPF_MAP_LOOKUP_BATCH walk of each (_walk says more)."""
    total, flows, _ = _walk(program, flow_limit, matcher)
    return total, flows


def _walk(program: XdpProgram, flow_limit: int | None, matcher: ServiceMatcher[ServiceKey] | None = None
          ) -> tuple[int, dict[tuple[ServiceKey, Address], int] | None, int]:
    """connection_summary's answer and the entries of rr_conns6 (IPv6 flows), from one walk of each map.

    An entry's service is the one its key matches in `matcher` (default: the services the map image
    holds now); entries of no service are left out of the counts. As core's ConnectionTable: every
    entry the tables hold counts, including idle ones the program has not rewritten yet (the LRU maps
    forget entries only by eviction). The counts are None when there are more than `flow_limit`
    entries (the walk goes on for the total). Under traffic, entries added or evicted during the walk
    may or may not be counted."""
    if matcher is None:
        matcher = ServiceMatcher({key: key for key in program.image.service_index})
    value_size = ctypes.sizeof(m.RrConn)
    words = value_size // 8  # rr_conn: backend_addr (16 bytes) is its first two 64-bit words
    total = total6 = 0
    counts: Counter[tuple[ServiceKey, tuple[int, int]]] | None = Counter()
    for name in m.CONN_MAPS:
        key_size = m.KEY_SIZES[name]
        for n, keys, values in libbpf.map_lookup_batches(program.fds[name], key_size, value_size):
            total += n
            total6 += n if name == m.MAP_CONNS6 else 0
            if counts is not None:
                if flow_limit is not None and total > flow_limit:
                    counts = None
                else:
                    view = memoryview(values).cast("Q")[0:n * words]
                    entries = zip((keys[i:i + key_size] for i in range(0, n * key_size, key_size)),
                                  zip(view[0::words], view[1::words]))
                    counts.update(matcher.tally(entries))
    if counts is None:
        return total, None, total6
    return total, {(s, as_address(m.from_identity(struct.pack("=QQ", *a)))): c for (s, a), c in counts.items()}, total6


def connection_evictions(program: XdpProgram, live: int | None = None) -> int:
    """Entries the kernel's LRU evicted from rr_conns since this program loaded, derived: inserts (the
    program's conn_insert: packets whose lookup found no entry at all) + the baseline (entries live in
    a reused rr_conns at start, entries added by write_connection) - entries live now - entries Python
    removed (delete_connection, clear_connections); never below 0.

    `live`: the entry count of a walk just made (connection_summary()[0]); walked here if None. Exact
    whenever the table is quiescent; under traffic it can lag (or lead) by the packets in flight during
    the walk, and a predecessor still inserting into a handed-over table after the baseline was read
    makes it low by those entries."""
    if live is None:
        live = program.count_connections()
    inserts = _stat(program, m.STAT_CONN_INSERT) + program.conn_inserts_reset
    return max(0, inserts + program.conn_baseline - live - program.conn_deleted)


def reset(program: XdpProgram) -> None:
    """Zero rr_stats and the rr_backend_stats slots in use (connection_evictions keeps counting: the
    conn_insert figure zeroed here is kept aside)."""
    program.conn_inserts_reset += _stat(program, m.STAT_CONN_INSERT)
    zero = bytes(8 * program.ncpus)
    for i in range(m.STAT_MAX):
        libbpf.map_update(program.fds[m.MAP_STATS], ctypes.c_uint32(i), zero)
    zero = bytes(ctypes.sizeof(m.RrBackendStats) * program.ncpus)
    for s, b in program.image.stat_slots:
        libbpf.map_update(program.fds[m.MAP_BACKEND_STATS], ctypes.c_uint32(m.backend_stats_slot(s, b)), zero)


def read(program: XdpProgram, ready: bool, flow_limit: int | None = FLOW_COUNT_LIMIT, *, refused: int = 0,
         matcher: ServiceMatcher[ServiceKey] | None = None, walk: bool = True) -> Counters:
    """Every figure of the program, in the shape every engine reports. `refused`: frames the device
    refused to transmit (engines/device.py TxRefusals), reported as tx_refused and not as forwarded.
    walk=False: rr_conns is not walked (connections, evictions 0 and flows None: the Engine protocol)."""
    values = stats(program)
    live, flows, live6 = _walk(program, flow_limit, matcher) if walk else (0, None, 0)
    drops = {reason.name.lower(): values[reason] for reason in DropReason}
    drops[DropReason.TX_REFUSED.name.lower()] = refused  # the device's figure: the program never counts it
    forwarded = max(0, values[m.STAT_FORWARDED] + values[m.STAT_FORWARDED_IPV6] - refused)  # each once, by family
    return Counters(
        forwarded=forwarded,
        forwarded_ipv6=min(values[m.STAT_FORWARDED_IPV6], forwarded),  # a refusal is not traced to a family
        connections_ipv6=live6,
        passed=values[m.STAT_PASSED],
        drops=drops,
        connections=live,
        connection_evictions=connection_evictions(program, live) if walk else 0,
        backends=backend_figures(program),
        flows=flows,
        ready=ready,
        engine=engine_figures(values),
        options={name: values[i] for i, name in m.OPTION_STATS.items()},
    )
