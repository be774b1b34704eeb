"""The XDP engine: loads src/rusty_rail/bpf/xdp_balancer.o through libbpf and writes its maps.

The program (docs/WIRE.md sections 1-9) decides per packet in the kernel; this class is its control
plane: configuration, backends, the Maglev table (built in Python by core/maglev.py), counters, the
connection table, BPF_PROG_TEST_RUN for tests and benchmarks, and attaching to an interface.

Backends keep their index in rr_backends for as long as they stay in the set (`sync_table`), because
connection entries name their backend by index (checked against its address): a table rebuild that
only removes other backends must not move a remaining backend's flows.

Two modes, as core/balancer.py (docs/WIRE.md section 10). Open mode (`sync_table`): one Maglev table at
rr_maglev[0..M). Services mode (`sync_services`): rr_config.services = 1; rr_services maps (VIP, port,
protocol) to a service index and its table size; service i's table is rr_maglev[i * stride ...] (stride =
the largest table, so rr_maglev holds max_services tables); rr_members holds, per service, a bitmap of
the rr_backends indices it lists (drained ones included), which a connection entry must name to be
used. Backend indices are global per address (one rr_backends entry per backend, whatever the number
of services listing it), so a next hop is written once and indices stay stable across changes.

Per-backend figures (`backend_stats`): the program adds every forward's packet and inner bytes to
rr_backend_stats[service index * MAX_BACKENDS + backend index] (open mode: service 0), per CPU. A slot is
zeroed before its (service, backend index) pair is listed again (a backend joins or rejoins a service,
an index or a service index is reused), so figures start from zero as core/service.py's Pool does and a
reused index never inherits another address's counts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address
from pathlib import Path

from rusty_rail.bpf import libbpf
from rusty_rail.core.flowhash import RR_HASH_SEED
from rusty_rail.core.service import ServiceKey
from rusty_rail.engines import xdp_maps as m

__all__ = ["XdpAction", "XdpBalancer", "XdpConnection", "default_object_path"]

_NS = 1_000_000_000


class XdpAction(IntEnum):
    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


@dataclass(frozen=True, slots=True)
class XdpConnection:
    key: bytes
    backend: IPv4Address
    backend_index: int
    last_seen_ns: int


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@contextlib.contextmanager
def _in_netns(fd: int) -> Iterator[None]:
    """Run the block in the network namespace `fd` refers to (this thread only), then come back."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(here).st_ino == os.fstat(fd).st_ino:
            yield
            return
        _setns(fd)
        try:
            yield
        finally:
            _setns(here)
    finally:
        os.close(here)


def default_object_path() -> Path:
    """The compiled program next to its source (`make bpf`)."""
    return Path(__file__).resolve().parent.parent / "bpf" / "xdp_balancer.o"


class XdpBalancer:
    """One loaded instance of the XDP program and its maps. Close it (or use `with`) to release it.

    `table_size` is the largest Maglev table this instance accepts; `max_services` how many services
    it holds in services mode (rr_maglev has max_services * table_size entries: 64 * 65537 * 4 bytes
    = 16 MiB by default; 1 for an open-mode-only instance; rr_backend_stats has max_services * 4096
    per-CPU slots of 16 bytes: 4 MiB per CPU by default, 64 KiB per CPU for one); `conn_capacity`
    bounds the LRU connection table.
    """

    def __init__(
        self,
        object_path: str | os.PathLike | None = None,
        *,
        table_size: int = m.DEFAULT_TABLE_SIZE,
        conn_capacity: int = m.DEFAULT_CONNS,
        pin_dir: str | None = None,
        max_services: int = m.DEFAULT_MAX_SERVICES,
        reuse_conns_fd: int | None = None,
    ) -> None:
        """`reuse_conns_fd`: an existing rr_conns map (a handover's pin) to use instead of a new one;
        its max_entries must equal `conn_capacity` (checked: ValueError)."""
        if max_services < 1:
            raise ValueError("max_services must be at least 1")
        path = Path(object_path) if object_path is not None else default_object_path()
        if not path.exists():
            raise FileNotFoundError(f"{path} (run `make bpf`)")
        self._obj = libbpf.BpfObject(str(path))
        try:
            self._obj.map(m.MAP_MAGLEV).set_max_entries(table_size * max_services)
            self._obj.map(m.MAP_CONNS).set_max_entries(conn_capacity)
            if reuse_conns_fd is not None:
                info = libbpf.map_info(reuse_conns_fd)
                if (info.key_size, info.value_size) != (ctypes.sizeof(m.RrFlowKey), ctypes.sizeof(m.RrConn)):
                    raise ValueError(f"the rr_conns to reuse has keys of {info.key_size} and values of "
                                     f"{info.value_size} bytes, not this program's")
                if info.max_entries != conn_capacity:
                    raise ValueError(f"the rr_conns to reuse holds {info.max_entries} entries, not {conn_capacity}")
                self._obj.map(m.MAP_CONNS).reuse_fd(reuse_conns_fd)
            self._obj.map(m.MAP_SERVICES).set_max_entries(2 * max_services)
            self._obj.map(m.MAP_MEMBERS).set_max_entries(m.MEMBER_WORDS * max_services)
            self._obj.map(m.MAP_BACKEND_STATS).set_max_entries(m.MAX_BACKENDS * max_services)
            program = self._obj.program(m.PROGRAM)
            program.capture_log(size=1 << 20, level=0)  # level 0: the log is filled only on failure
            try:
                self._obj.load()
            except libbpf.LibbpfError as exc:
                raise libbpf.LibbpfError(exc.errno, f"{exc.strerror}\n{program.log[-4000:]}") from None
            self.prog_fd = program.fd
            self._maps = {name: self._obj.map(name) for name in (m.MAP_CONFIG, m.MAP_BACKENDS, m.MAP_MAGLEV,
                                                                  m.MAP_CONNS, m.MAP_STATS, m.MAP_SERVICES,
                                                                  m.MAP_MEMBERS, m.MAP_BACKEND_STATS)}
            self._fd = {name: mp.fd for name, mp in self._maps.items()}
            self.max_table_size = table_size
            self.max_services = max_services
            self.conn_capacity = conn_capacity
            self.ncpus = libbpf.num_possible_cpus()
            self._pinned: list[tuple[libbpf.BpfMap, str]] = []
            # For connection_evictions(): entries this instance did not see the program insert (live
            # in a reused rr_conns at start, written by write_connection), entries Python removed,
            # and the conn_insert counts zeroed by reset_stats().
            self._conn_baseline = self._count_connections() if reuse_conns_fd is not None else 0
            self._conn_deleted = 0
            self._conn_inserts_reset = 0
            if pin_dir is not None:
                self.pin_maps(pin_dir)
        except BaseException:
            self._obj.close()
            raise
        self._config = m.make_config("0.0.0.0", b"\x00" * 6, 0, 0, RR_HASH_SEED, (300 * _NS, 60 * _NS, 30 * _NS))
        self._config.table_stride = table_size
        self._index_of: dict[int, int] = {}        # backend address (int) -> rr_backends index
        self._macs: dict[int, bytes | None] = {}
        self._free: list[int] = []
        self._next_index = 0
        # Services mode: what the maps hold, so a sync writes only what changed.
        self._svc_index: dict[ServiceKey, int] = {}
        self._svc_free: list[int] = []
        self._svc_next = 0
        self._svc_tables: dict[int, list[int]] = {}          # service index -> slots written
        self._svc_members: dict[int, frozenset[int]] = {}    # service index -> member bits written
        self._svc_entries: dict[bytes, tuple[int, int]] = {} # rr_services key -> (index, table size)
        # rr_backend_stats slots in use: (service index, backend index) -> (service or None in open
        # mode, backend address as int): what the slot's figures belong to.
        self._stat_slots: dict[tuple[int, int], tuple[ServiceKey | None, int]] = {}
        self._attached: tuple[int, int] | None = None  # (ifindex, mode flags)
        self.replaced_program_id = 0                   # a leftover program attach() removed
        self._netns_fd: int | None = None              # the namespace of the attached interface

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        if self._attached is not None:
            self.detach()
        for mp, path in self._pinned:
            try:
                mp.unpin(path)
            except OSError:
                pass
        self._pinned = []
        self._obj.close()

    def __enter__(self) -> XdpBalancer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def hand_over(self, directory: str) -> None:
        """Leave the program attached and pin what a successor needs in `directory` (bpffs): rr_conns
        (the flows' backends) and rr_backends (which index names which backend, for adopt_backend_indices).
        After this, close() neither detaches nor touches the device; the successor replaces the program
        atomically (attach(replace_fd=...)) and removes the pins."""
        os.makedirs(directory, exist_ok=True)
        for name in (m.MAP_BACKENDS, m.MAP_CONNS):  # rr_conns last: its pin says the handover is complete
            path = os.path.join(directory, name)
            if os.path.exists(path):
                os.unlink(path)
            libbpf.obj_pin(self._fd[name], path)
        self._attached = None
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None

    def adopt_backend_indices(self, backends_fd: int) -> dict[IPv4Address, int]:
        """Take the backend indices of a predecessor's rr_backends (in use entries), so that the
        connection entries it wrote (index + address) stay valid here. Call before the first sync."""
        size = ctypes.sizeof(m.RrBackend)
        adopted: dict[IPv4Address, int] = {}
        for i in range(m.MAX_BACKENDS):
            raw = libbpf.map_lookup(backends_fd, ctypes.c_uint32(i), size)
            if raw is None:
                continue
            b = m.RrBackend.from_buffer_copy(raw)
            if b.in_use:
                adopted[IPv4Address(bytes(b.addr))] = i
        if adopted:
            self._index_of = {int(a): i for a, i in adopted.items()}
            self._next_index = max(adopted.values()) + 1
            used = set(adopted.values())
            self._free = [i for i in range(self._next_index) if i not in used]
        return adopted

    def pin_maps(self, pin_dir: str) -> None:
        """Pin every map as pin_dir/<map name> (bpffs), e.g. for another process's control plane."""
        os.makedirs(pin_dir, exist_ok=True)
        for name, mp in self._maps.items():
            path = os.path.join(pin_dir, name)
            if os.path.exists(path):
                os.unlink(path)
            mp.pin(path)
            self._pinned.append((mp, path))

    # -- configuration ----------------------------------------------------------------------------

    def configure(
        self,
        local_addr: IPv4Address | str | int,
        local_mac: bytes,
        *,
        hash_seed: int = RR_HASH_SEED,
        timeouts: tuple[float, float, float] | object | None = None,
    ) -> None:
        """The device's address and MAC (outer source of forwarded frames), the flow hash seed, and
        the idle timeouts in seconds: a (tcp, udp, other) tuple or core.conntrack.Timeouts."""
        cfg = self._config
        cfg.local_addr = (ctypes.c_uint8 * 4)(*IPv4Address(local_addr).packed)
        if len(local_mac) != 6:
            raise ValueError("local_mac must be 6 bytes")
        cfg.local_mac = (ctypes.c_uint8 * 6)(*local_mac)
        cfg.hash_seed = hash_seed & 0xFFFFFFFF
        if timeouts is not None:
            if not isinstance(timeouts, tuple):
                timeouts = (timeouts.tcp, timeouts.udp, timeouts.other)
            cfg.conn_timeout_ns = (ctypes.c_uint64 * 3)(*(int(t * _NS) for t in timeouts))
        self.write_config()

    def write_config(self, config: m.RrConfig | None = None) -> None:
        if config is not None:
            self._config = config
        libbpf.map_update(self._fd[m.MAP_CONFIG], ctypes.c_uint32(0), self._config)

    def read_config(self) -> m.RrConfig:
        raw = libbpf.map_lookup(self._fd[m.MAP_CONFIG], ctypes.c_uint32(0), ctypes.sizeof(m.RrConfig))
        return m.RrConfig.from_buffer_copy(raw)

    # -- backends and the Maglev table: raw access ------------------------------------------------

    def write_backend(self, index: int, addr: IPv4Address | str | int, mac: bytes | None, in_use: bool = True) -> None:
        if not 0 <= index < m.MAX_BACKENDS:
            raise ValueError(f"backend index {index} out of range")
        libbpf.map_update(self._fd[m.MAP_BACKENDS], ctypes.c_uint32(index), m.make_backend(addr, mac, in_use))

    def read_backend(self, index: int) -> m.RrBackend:
        raw = libbpf.map_lookup(self._fd[m.MAP_BACKENDS], ctypes.c_uint32(index), ctypes.sizeof(m.RrBackend))
        return m.RrBackend.from_buffer_copy(raw)

    def _write_array(self, name: str, start: int, values: Sequence[int], fmt: type = ctypes.c_uint32) -> None:
        """values[i] -> array map `name` at start + i, in one syscall where the kernel can."""
        n = len(values)
        if not n:
            return
        fd = self._fd[name]
        keys = libbpf.pack_u32s(range(start, start + n))
        packed = bytes((fmt * n)(*values))
        try:
            libbpf.map_update_batch(fd, keys, packed, n)
        except libbpf.LibbpfError:  # kernels without batch ops on arrays: one by one
            for i, v in enumerate(values):
                libbpf.map_update(fd, ctypes.c_uint32(start + i), fmt(v))

    def _write_slots(self, service_index: int, slots: Sequence[int]) -> None:
        n = len(slots)
        if n > self.max_table_size:
            raise ValueError(f"table of {n} slots exceeds rr_maglev's {self.max_table_size} per table")
        self._write_array(m.MAP_MAGLEV, service_index * self.max_table_size, slots)

    def write_table(self, slots: Sequence[int]) -> None:
        """The whole open-mode Maglev table: slot -> rr_backends index. Sets the table size in the config."""
        self._write_slots(0, slots)
        self._svc_tables.pop(0, None)  # service 0's table (services mode) is overwritten
        self._config.table_size = len(slots)
        self.write_config()

    def read_table(self, size: int | None = None, service: ServiceKey | None = None) -> list[int]:
        """The open-mode table, or (services mode) the table of `service`."""
        start = 0
        if service is not None:
            start = self._svc_index[service] * self.max_table_size
            n = self._svc_entries[m.service_key_bytes(service.vip, service.port, service.protocol)][1]
        else:
            n = self._config.table_size
        if size is not None:
            n = size
        fd = self._fd[m.MAP_MAGLEV]
        return [struct.unpack("=I", libbpf.map_lookup(fd, ctypes.c_uint32(start + i), 4))[0] for i in range(n)]

    def set_backend_count(self, count: int) -> None:
        self._config.backend_count = count
        self.write_config()

    # -- backends and the Maglev table: from core's objects ---------------------------------------

    def sync_table(self, table, macs: Mapping[int, bytes | None] | None = None) -> None:
        """Open mode: make the maps hold `table` (a core.maglev.MaglevTable) with stable backend indices.

        Order matters while the program runs: new backends are written before the table names them,
        and departed ones are retired only after the table stops naming them.
        """
        addresses = [int(b) for b in table.backends]
        self._write_backends(addresses, macs)
        self._claim_stat_slots({(0, self._index_of[a]): (None, a) for a in addresses})
        self._config.services = 0  # written by write_table below
        self.write_table([self._index_of[addresses[s]] for s in table.slots])
        self.set_backend_count(len(addresses))
        self._retire_services(set())
        self._retire_backends(set(addresses))

    def sync_services(self, tables: Mapping[ServiceKey, object], macs: Mapping[int, bytes | None] | None = None) -> None:
        """Services mode: make the maps hold one table (core.maglev.MaglevTable) per service.

        Order matters while the program runs: backends, member bits (old and new listed while the table
        changes) and tables are written before rr_services names them; services that left are removed
        from rr_services before their index is freed, and backends are retired last.
        """
        if len(tables) > self.max_services:
            raise ValueError(f"{len(tables)} services: more than max_services = {self.max_services}")
        listed = {key: [int(b) for b in table.backends] for key, table in tables.items()}
        wanted: set[int] = set().union(*listed.values()) if listed else set()
        if len(wanted) > m.MAX_BACKENDS:
            raise ValueError(f"more than {m.MAX_BACKENDS} backends")
        self._write_backends(sorted(wanted), macs)
        leaving = [k for k in self._svc_index if k not in tables]
        for key in tables:
            if key not in self._svc_index:
                if not self._svc_free and self._svc_next >= self.max_services:
                    # Every index is taken, some by services that are leaving: retire one now.
                    gone = self._svc_index[leaving.pop()]
                    self._write_service_entries({k: v for k, v in self._svc_entries.items() if v[0] != gone})
                    self._retire_services(set(self._svc_index) - {k for k, i in self._svc_index.items() if i == gone})
                self._svc_index[key] = self._allocate_service()
        self._claim_stat_slots({(self._svc_index[key], self._index_of[a]): (key, a)
                                for key, addresses in listed.items() for a in addresses})
        entries: dict[bytes, tuple[int, int]] = {}
        new_members: dict[int, frozenset[int]] = {}
        for key, table in tables.items():
            i = self._svc_index[key]
            members = frozenset(self._index_of[a] for a in listed[key])
            old = self._svc_members.get(i, frozenset())
            if members != old:
                self._write_members(i, members | old)
            new_members[i] = members
            slots = [self._index_of[listed[key][s]] for s in table.slots]
            if self._svc_tables.get(i) != slots:
                self._write_slots(i, slots)
                self._svc_tables[i] = slots
            entries[m.service_key_bytes(key.vip, key.port, key.protocol)] = (i, len(slots))
        # A TCP/UDP key without ports: the lowest-port service of its VIP and protocol (service.py).
        for key in sorted(tables, key=lambda k: k.port, reverse=True):
            if key.protocol:
                entries[m.service_key_bytes(key.vip, 0, key.protocol, fragment=True)] = entries[
                    m.service_key_bytes(key.vip, key.port, key.protocol)]
        cfg = self._config
        cfg.services, cfg.table_stride, cfg.table_size, cfg.backend_count = 1, self.max_table_size, 0, len(wanted)
        self.write_config()
        self._write_service_entries(entries)
        for i, members in new_members.items():
            if self._svc_members.get(i) != members:
                self._write_members(i, members)
        self._retire_services(set(tables))
        self._retire_backends(wanted)

    def _write_backends(self, addresses: Sequence[int], macs: Mapping[int, bytes | None] | None) -> None:
        if macs is not None:
            for addr, mac in macs.items():
                self._macs[int(addr)] = mac
        for addr in addresses:
            index = self._index_of.get(addr)
            if index is None:
                index = self._allocate()
                self._index_of[addr] = index
            self.write_backend(index, addr, self._macs.get(addr))

    def _retire_backends(self, wanted: set[int]) -> None:
        for addr in [a for a in self._index_of if a not in wanted]:
            index = self._index_of.pop(addr)
            self.write_backend(index, addr, None, in_use=False)
            self._free.append(index)

    def _claim_stat_slots(self, wanted: dict[tuple[int, int], tuple[ServiceKey | None, int]]) -> None:
        """Make `wanted` the rr_backend_stats slots in use, zeroing those that were not in use for the
        same (service, address). Called before any table or member bit names a new pair, so the
        program cannot have counted into such a slot since it was last in use (or ever)."""
        fresh = [slot for slot, owner in wanted.items() if self._stat_slots.get(slot) != owner]
        if fresh:
            keys = [m.backend_stats_slot(s, b) for s, b in fresh]
            zero = bytes(ctypes.sizeof(m.RrBackendStats) * self.ncpus)
            fd = self._fd[m.MAP_BACKEND_STATS]
            try:
                libbpf.map_update_batch(fd, libbpf.pack_u32s(keys), zero * len(keys), len(keys))
            except libbpf.LibbpfError:  # kernels without batch ops on arrays: one by one
                for k in keys:
                    libbpf.map_update(fd, ctypes.c_uint32(k), zero)
        self._stat_slots = dict(wanted)

    def _write_members(self, service_index: int, members: frozenset[int]) -> None:
        words = [0] * m.MEMBER_WORDS
        for b in members:
            words[b >> 6] |= 1 << (b & 63)
        self._write_array(m.MAP_MEMBERS, service_index * m.MEMBER_WORDS, words, ctypes.c_uint64)
        self._svc_members[service_index] = members

    def _write_service_entries(self, entries: dict[bytes, tuple[int, int]]) -> None:
        fd = self._fd[m.MAP_SERVICES]
        for key, (index, size) in entries.items():
            if self._svc_entries.get(key) != (index, size):
                libbpf.map_update(fd, key, m.RrService(index=index, table_size=size))
        for key in [k for k in self._svc_entries if k not in entries]:
            libbpf.map_delete(fd, key)
        self._svc_entries = dict(entries)

    def _retire_services(self, wanted: set[ServiceKey]) -> None:
        """Forget the services not in `wanted` (all of them when switching to open mode)."""
        if not wanted:
            self._write_service_entries({})
        for key in [k for k in self._svc_index if k not in wanted]:
            i = self._svc_index.pop(key)
            if self._svc_members.get(i):
                self._write_members(i, frozenset())
            self._svc_members.pop(i, None)
            self._svc_tables.pop(i, None)
            self._svc_free.append(i)

    def _allocate_service(self) -> int:
        if self._svc_free:
            return self._svc_free.pop(0)
        if self._svc_next >= self.max_services:
            raise ValueError(f"more than {self.max_services} services (max_services)")
        self._svc_next += 1
        return self._svc_next - 1

    def service_index(self, service: ServiceKey) -> int | None:
        return self._svc_index.get(service)

    def service_entries(self) -> dict[bytes, tuple[int, int]]:
        """rr_services as the kernel holds it: key bytes (service_key_bytes) -> (index, table size)."""
        fd = self._fd[m.MAP_SERVICES]
        out = {}
        for key in libbpf.map_keys(fd, ctypes.sizeof(m.RrServiceKey)):
            raw = libbpf.map_lookup(fd, key, ctypes.sizeof(m.RrService))
            if raw is not None:
                value = m.RrService.from_buffer_copy(raw)
                out[key] = (value.index, value.table_size)
        return out

    def set_neighbour(self, backend: IPv4Address | str | int, mac: bytes | None) -> None:
        """The MAC of `backend`'s next hop (None: unknown, NO_NEIGHBOUR)."""
        addr = int(IPv4Address(backend))
        self._macs[addr] = mac
        index = self._index_of.get(addr)
        if index is not None:
            self.write_backend(index, addr, mac)

    def backend_index(self, backend: IPv4Address | str | int) -> int | None:
        return self._index_of.get(int(IPv4Address(backend)))

    def sync_from_balancer(self, balancer) -> None:
        """Mirror a core.balancer.Balancer's configuration, tables and neighbours into the maps, in
        either mode (open: `balancer.pool`; services: `balancer.services`)."""
        self.configure(balancer.local_address, balancer.local_mac, hash_seed=balancer.hash_seed,
                       timeouts=balancer.connections.timeouts)
        macs = {int(b): balancer.neighbour(b) for b in balancer.backends}
        if balancer.pool is not None:
            self.sync_table(balancer.table, macs)
        else:
            self.sync_services({key: pool.table for key, pool in balancer.services.items()}, macs)

    def _allocate(self) -> int:
        if self._free:
            return self._free.pop(0)
        if self._next_index >= m.MAX_BACKENDS:
            raise ValueError(f"more than {m.MAX_BACKENDS} backends")
        self._next_index += 1
        return self._next_index - 1

    # -- counters ---------------------------------------------------------------------------------

    def stats(self) -> list[int]:
        """rr_stats summed over CPUs, by index (rr_structs.h)."""
        fd = self._fd[m.MAP_STATS]
        size = 8 * self.ncpus
        out = []
        for i in range(m.STAT_MAX):
            raw = libbpf.map_lookup(fd, ctypes.c_uint32(i), size)
            out.append(sum(struct.unpack(f"={self.ncpus}Q", raw)))
        return out

    def _stat(self, index: int) -> int:
        raw = libbpf.map_lookup(self._fd[m.MAP_STATS], ctypes.c_uint32(index), 8 * self.ncpus)
        return sum(struct.unpack(f"={self.ncpus}Q", raw)) if raw is not None else 0

    def connection_evictions(self, live: int | None = None) -> int:
        """Entries the kernel's LRU evicted from rr_conns since this instance loaded, derived (the
        kernel does not count them): inserts (the program's conn_insert: packets whose lookup found no
        entry at all) + the baseline (entries live in a reused rr_conns at start, entries added by
        write_connection) - entries live now - entries Python removed (delete_connection,
        clear_connections); never below 0.

        `live`: the entry count of a walk just made (connection_summary()[0]); walked here if None.
        Exact whenever the table is quiescent; under traffic it can lag (or lead) by the packets in
        flight during the walk, and a predecessor's program still inserting into a handed-over table
        after the baseline was read makes it low by those entries."""
        if live is None:
            live = self._count_connections()
        inserts = self._stat(m.STAT_CONN_INSERT) + self._conn_inserts_reset
        return max(0, inserts + self._conn_baseline - live - self._conn_deleted)

    def counters(self) -> dict[str, int]:
        """Named counters: forwarded, passed, conn_hit, conn_new, conn_insert, drop_<reason> (as
        Balancer.counters, plus conn_insert: see connection_evictions())."""
        values = self.stats()
        return {name: values[i] for i, name in sorted(m.stat_names().items())}

    def reset_stats(self) -> None:
        """Zero rr_stats and the rr_backend_stats slots in use (connection_evictions() keeps counting:
        the conn_insert figure zeroed here is kept aside)."""
        fd = self._fd[m.MAP_STATS]
        self._conn_inserts_reset += self._stat(m.STAT_CONN_INSERT)
        zero = bytes(8 * self.ncpus)
        for i in range(m.STAT_MAX):
            libbpf.map_update(fd, ctypes.c_uint32(i), zero)
        slots, self._stat_slots = self._stat_slots, {}
        self._claim_stat_slots(slots)

    def backend_stats(self) -> dict[tuple[ServiceKey | None, IPv4Address], tuple[int, int]]:
        """(packets, inner bytes) forwarded per (service, backend) listed now, summed over CPUs; the
        service is None in open mode. The shape of BalancerDataplane.counters()['backends']."""
        fd = self._fd[m.MAP_BACKEND_STATS]
        size = ctypes.sizeof(m.RrBackendStats)
        out: dict[tuple[ServiceKey | None, IPv4Address], tuple[int, int]] = {}
        for (s, b), (service, addr) in self._stat_slots.items():
            raw = libbpf.map_lookup(fd, ctypes.c_uint32(m.backend_stats_slot(s, b)), size * self.ncpus)
            values = struct.unpack(f"={2 * self.ncpus}Q", raw) if raw is not None else (0, 0)
            out[(service, IPv4Address(addr))] = (sum(values[0::2]), sum(values[1::2]))
        return out

    # -- connection table -------------------------------------------------------------------------

    def connection(self, key: bytes) -> XdpConnection | None:
        raw = libbpf.map_lookup(self._fd[m.MAP_CONNS], key, ctypes.sizeof(m.RrConn))
        if raw is None:
            return None
        conn = m.RrConn.from_buffer_copy(raw)
        return XdpConnection(key, IPv4Address(bytes(conn.backend_addr)), conn.backend_index, conn.last_seen_ns)

    def connection_summary(self, flow_limit: int | None = None) -> tuple[int, dict[IPv4Address, int] | None]:
        """(entries in rr_conns, entries naming each backend address), in one BPF_MAP_LOOKUP_BATCH walk.

        As core's ConnectionTable: every entry the table holds counts, including idle ones the program
        has not yet rewritten (the LRU map forgets entries only by eviction). The per-backend counts are
        None when there are more than `flow_limit` entries (the walk goes on for the total; counting
        per backend is the Python-side cost). Under traffic, entries added or evicted during the walk
        may or may not be counted."""
        key_size, value_size = ctypes.sizeof(m.RrFlowKey), ctypes.sizeof(m.RrConn)
        words = value_size // 4  # rr_conn: backend_addr is its first 32-bit word
        total = 0
        counts: Counter[int] | None = Counter()
        for n, _, values in libbpf.map_lookup_batches(self._fd[m.MAP_CONNS], key_size, value_size):
            total += n
            if counts is not None:
                if flow_limit is not None and total > flow_limit:
                    counts = None
                else:
                    counts.update(memoryview(values).cast("I")[0::words])
        if counts is None:
            return total, None
        return total, {IPv4Address(struct.pack("=I", a)): c for a, c in counts.items()}

    def _count_connections(self) -> int:
        key_size, value_size = ctypes.sizeof(m.RrFlowKey), ctypes.sizeof(m.RrConn)
        return sum(n for n, _, _ in libbpf.map_lookup_batches(self._fd[m.MAP_CONNS], key_size, value_size))

    def connections(self) -> list[XdpConnection]:
        keys = libbpf.map_keys(self._fd[m.MAP_CONNS], ctypes.sizeof(m.RrFlowKey))
        return [c for c in (self.connection(k) for k in keys) if c is not None]

    def write_connection(self, key: bytes, backend: IPv4Address | str | int, last_seen_ns: int) -> None:
        """Insert an entry by hand (tests: stickiness, timeouts). The backend must be in the set."""
        index = self._index_of[int(IPv4Address(backend))]
        conn = m.RrConn(backend_index=index, last_seen_ns=last_seen_ns)
        conn.backend_addr = (ctypes.c_uint8 * 4)(*IPv4Address(backend).packed)
        fd = self._fd[m.MAP_CONNS]
        new = libbpf.map_lookup(fd, key, ctypes.sizeof(m.RrConn)) is None
        libbpf.map_update(fd, key, conn)
        if new:
            self._conn_baseline += 1  # an entry the program did not insert (connection_evictions)

    def delete_connection(self, key: bytes) -> bool:
        """Forget one flow (benchmarks: force the next packet of it to miss). True if it was there."""
        deleted = libbpf.map_delete(self._fd[m.MAP_CONNS], key)
        self._conn_deleted += int(deleted)
        return deleted

    def clear_connections(self) -> int:
        fd = self._fd[m.MAP_CONNS]
        keys = libbpf.map_keys(fd, ctypes.sizeof(m.RrFlowKey))
        deleted = sum(libbpf.map_delete(fd, k) for k in keys)
        self._conn_deleted += deleted
        return deleted

    # -- running the program ----------------------------------------------------------------------

    def test_run(self, frame: bytes) -> tuple[XdpAction, bytes]:
        """Run the program once on `frame` (BPF_PROG_TEST_RUN): (action, the frame as it left).

        The kernel refuses frames shorter than an Ethernet header (14 bytes) with EINVAL.
        """
        action, out, _ = libbpf.prog_test_run(self.prog_fd, frame, repeat=1)
        return XdpAction(action), out

    def test_run_timed(self, frame: bytes, repeat: int) -> tuple[XdpAction, bytes, int]:
        """Run `repeat` times in the kernel; returns (action, output, average ns per run).

        Caveat for benchmarks: the kernel does not restore the frame between repetitions, so after a
        forward (XDP_TX) every later run processes the previous output, itself a plain GRE frame
        (no GRE options or checksum, connection-table hit). Drops and passes are unaffected.
        """
        action, out, duration = libbpf.prog_test_run(self.prog_fd, frame, repeat=repeat)
        return XdpAction(action), out, duration

    # -- attaching --------------------------------------------------------------------------------

    def attach(self, interface: str | int, mode: str = "native", replace_fd: int | None = None) -> None:
        """Attach to `interface` (name or ifindex) in "native" (driver; veth supports it) or "skb"
        mode. A program left there by an earlier run (ours or not) is replaced and reported.

        `replace_fd`: the program attached now (a handover's), replaced atomically (XDP_FLAGS_REPLACE):
        the device never runs without a program. Fails (EEXIST) if another program is attached."""
        ifindex = interface if isinstance(interface, int) else socket.if_nametoindex(interface)
        flags = {"native": libbpf.XDP_FLAGS_DRV_MODE, "skb": libbpf.XDP_FLAGS_SKB_MODE}[mode]
        leftover = libbpf.xdp_query_id(ifindex, 0)
        if replace_fd is not None:
            libbpf.xdp_attach(ifindex, self.prog_fd, flags, old_prog_fd=replace_fd)
            self.replaced_program_id = leftover
        elif leftover:
            # Detach in every mode: a leftover generic program would block a native one and vice versa.
            for f in (libbpf.XDP_FLAGS_DRV_MODE, libbpf.XDP_FLAGS_SKB_MODE):
                try:
                    libbpf.xdp_detach(ifindex, f)
                except OSError:
                    pass
            self.replaced_program_id = leftover
        if replace_fd is None:
            libbpf.xdp_attach(ifindex, self.prog_fd, flags)
        self._attached = (ifindex, flags)
        # An ifindex means something only in its namespace: remember which one, so that detach()
        # never acts on an interface of another namespace (e.g. the host's) with the same number.
        self._netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def detach(self) -> None:
        """Remove the program from the interface it was attached to, from any network namespace."""
        if self._attached is None:
            return
        ifindex, flags = self._attached
        self._attached = None
        netns_fd, self._netns_fd = self._netns_fd, None
        try:
            with _in_netns(netns_fd):
                libbpf.xdp_detach(ifindex, flags)
        except OSError as exc:
            if exc.errno != errno.ENODEV:  # the interface is already gone: nothing to detach
                raise
        finally:
            os.close(netns_fd)

    @property
    def attached_ifindex(self) -> int | None:
        return self._attached[0] if self._attached else None



# -- a pass-everything program for veth peers ------------------------------------------------------------


def xdp_pass_object_path() -> Path:
    return Path(__file__).resolve().parent.parent / "bpf" / "xdp_pass.o"


def _ifindex(interface: str | int) -> int:
    return interface if isinstance(interface, int) else socket.if_nametoindex(interface)


def detach_xdp(interface: str | int) -> int:
    """Remove any XDP program (native or generic) from `interface` in this thread's namespace.
    Returns the id of the program that was there (0: none)."""
    ifindex = _ifindex(interface)
    previous = libbpf.xdp_query_id(ifindex, 0)
    if previous:
        for flags in (libbpf.XDP_FLAGS_DRV_MODE, libbpf.XDP_FLAGS_SKB_MODE):
            try:
                libbpf.xdp_detach(ifindex, flags)
            except OSError:
                pass  # nothing in that mode
    return previous


def attach_xdp_pass(interface: str | int, mode: str = "native") -> int:
    """Attach bpf/xdp_pass.o (XDP_PASS for every frame) to `interface` in this thread's namespace,
    replacing whatever XDP program is there. Returns the attached program's id.

    Why: XDP_TX from a veth reaches its peer only when the peer runs an XDP program too. The program
    stays attached after this returns (the interface holds it) until detach_xdp() or the veth goes.
    """
    path = xdp_pass_object_path()
    if not path.exists():
        raise FileNotFoundError(f"{path} (run `make bpf`)")
    ifindex = _ifindex(interface)
    flags = {"native": libbpf.XDP_FLAGS_DRV_MODE, "skb": libbpf.XDP_FLAGS_SKB_MODE}[mode]
    with libbpf.BpfObject(str(path)) as obj:
        obj.load()
        detach_xdp(ifindex)
        libbpf.xdp_attach(ifindex, obj.program("rr_pass").fd, flags)
    return libbpf.xdp_query_id(ifindex, 0)
