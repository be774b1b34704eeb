"""`XdpProgram`: one loaded instance of bpf/xdp_balancer.o and its maps, through libbpf.

What it does: load (sized for the largest table, the connection capacity and the services it must
hold, optionally with a handover's pinned rr_conns as its connection table), write the maps (`sync`
executes planner.plan's writes and keeps the image of what the maps hold), attach (replacing whatever
runs there atomically) and detach, pin for a handover, run the program on a frame (BPF_PROG_TEST_RUN)
and read or write connection entries (tests, explain). The decision itself is the C program's
(docs/WIRE.md); the counters are read by counters.py.

Also `attach_pass` and `detach_all`, for the lab and the tests: XDP_TX from a veth reaches its peer only
when the peer runs an XDP program too, and bpf/xdp_pass.o is the least such program.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from rusty_rail.bpf import build, libbpf
from rusty_rail.bpf.netns import in_netns
from rusty_rail.core.address import Address, AddressLike, address_int, as_address
from rusty_rail.core.constants import DEFAULT_CONN_CAPACITY, DEFAULT_TABLE_SIZE, RR_HASH_SEED
from rusty_rail.core.flowhash import flow_hash
from rusty_rail.dataplane.engine import DEFAULT_MAX_SERVICES
from rusty_rail.engines.xdp import maps as m
from rusty_rail.engines.xdp.planner import Desired, MapImage, Write, adopt, plan

__all__ = ["XdpAction", "XdpConnection", "XdpProgram", "attach_pass", "default_object_path", "detach_all",
           "read_backend_indices", "running_mode"]

_MODES = {"native": libbpf.XDP_FLAGS_DRV_MODE, "skb": libbpf.XDP_FLAGS_SKB_MODE}
"""Attach modes: "native" (the driver's; veth has it) or "skb" (generic: any device, slower)."""


class XdpAction(IntEnum):
    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


@dataclass(frozen=True, slots=True)
class XdpConnection:
    key: bytes
    """16 bytes (IPv4, rr_conns) or 40 (IPv6, rr_conns6)."""
    backend: Address
    backend_index: int
    last_seen_ns: int
    """CLOCK_MONOTONIC (time.monotonic_ns()) at tick resolution."""
    flow_hash: int = 0
    """The flow hash the program stored (the outer IPv6 flow label comes from it)."""


def default_object_path() -> Path:
    """The compiled program (bpf/build.py compiles it when missing or older than its sources)."""
    return build.object_path("xdp_balancer")


def _ifindex(interface: str | int) -> int:
    return interface if isinstance(interface, int) else socket.if_nametoindex(interface)


def _detach_every_mode(ifindex: int) -> int:
    """Remove whatever XDP program `ifindex` runs (native or generic); its id, 0 for none."""
    previous = libbpf.xdp_query_id(ifindex, 0)
    if previous:
        for flags in _MODES.values():
            try:
                libbpf.xdp_detach(ifindex, flags)
            except OSError:
                pass  # nothing in that mode
    return previous


def running_mode(interface: str | int) -> str | None:
    """The mode ("native" or "skb") of the XDP program running on `interface` (this thread's namespace),
    None when there is none."""
    ifindex = _ifindex(interface)
    for mode, flags in _MODES.items():
        if libbpf.xdp_query_id(ifindex, flags):
            return mode
    return None


def detach_all(interface: str | int, netns: str | None = None) -> int:
    """Remove any XDP program, every mode, from `interface` (in the namespace named `netns`, or this
    thread's). Returns the id of the program that was there (0: none)."""
    with in_netns(netns):
        return _detach_every_mode(_ifindex(interface))


def attach_pass(interface: str | int, mode: str = "native", netns: str | None = None) -> int:
    """Attach bpf/xdp_pass.o (XDP_PASS for every frame) to `interface`, replacing whatever XDP program
    is there; in the namespace named `netns`, or this thread's. Returns the attached program's id.
    It stays attached (the interface holds it) until detach_all() or the interface goes."""
    path = build.object_path("xdp_pass")
    if not path.exists():
        raise FileNotFoundError(f"{path} (run `make bpf`)")
    with in_netns(netns), libbpf.BpfObject(str(path)) as obj:
        obj.load()
        ifindex = _ifindex(interface)
        _detach_every_mode(ifindex)
        libbpf.xdp_attach(ifindex, obj.program(m.PASS_PROGRAM).fd, _MODES[mode])
        return libbpf.xdp_query_id(ifindex, 0)


def read_backend_indices(backends_fd: int) -> dict[int, int]:
    """The in-use entries of an rr_backends map (a handover predecessor's pin): {index: address}."""
    size = ctypes.sizeof(m.RrBackend)
    out = {}
    for i in range(m.MAX_BACKENDS):
        raw = libbpf.map_lookup(backends_fd, ctypes.c_uint32(i), size)
        if raw is not None:
            b = m.RrBackend.from_buffer_copy(raw)
            if b.in_use:
                out[i] = m.from_identity(bytes(b.addr))
    return out


class XdpProgram:
    """One loaded instance of the XDP program and its maps. Close it (or use `with`) to release it.

    `table_size` is the largest Maglev table it takes and `max_services` how many services: rr_maglev
    has max_services * table_size entries (64 * 65537 * 4 bytes = 16 MiB by default), rr_backend_stats
    max_services * 4096 per-CPU slots of 16 bytes (4 MiB per CPU by default); `conn_capacity` bounds
    each LRU connection table (rr_conns for IPv4 flows, rr_conns6 for IPv6 ones). `reuse_conns_fd`,
    `reuse_conns6_fd`: an existing rr_conns / rr_conns6 (a handover's pins) to use instead of new ones;
    their sizes must be this program's (else ValueError).
    """

    def __init__(self, object_path: str | os.PathLike | None = None, *, table_size: int = DEFAULT_TABLE_SIZE,
                 conn_capacity: int = DEFAULT_CONN_CAPACITY, max_services: int = DEFAULT_MAX_SERVICES,
                 reuse_conns_fd: int | None = None, reuse_conns6_fd: int | None = None) -> None:
        if max_services < 1 or table_size < 1:
            raise ValueError("table_size and max_services must be at least 1")
        path = Path(object_path) if object_path is not None else default_object_path()
        if not path.exists():
            raise FileNotFoundError(f"{path} (run `make bpf`)")
        self._obj = libbpf.BpfObject(str(path))
        try:
            self._obj.map(m.MAP_MAGLEV).set_max_entries(table_size * max_services)
            for name, key_type, reuse in ((m.MAP_CONNS, m.RrFlowKey, reuse_conns_fd),
                                          (m.MAP_CONNS6, m.RrFlowKey6, reuse_conns6_fd)):
                self._obj.map(name).set_max_entries(conn_capacity)
                if reuse is None:
                    continue
                info = libbpf.map_info(reuse)
                if (info.key_size, info.value_size) != (ctypes.sizeof(key_type), ctypes.sizeof(m.RrConn)):
                    raise ValueError(f"the {name} to reuse has keys of {info.key_size} and values of "
                                     f"{info.value_size} bytes, not this program's")
                if info.max_entries != conn_capacity:
                    raise ValueError(f"the {name} to reuse holds {info.max_entries} entries, not {conn_capacity}")
                self._obj.map(name).reuse_fd(reuse)
            for name in (m.MAP_SERVICES, m.MAP_SERVICES6):
                self._obj.map(name).set_max_entries(2 * max_services)  # each + its fragment fallback
            self._obj.map(m.MAP_MEMBERS).set_max_entries(m.MEMBER_WORDS * max_services)
            self._obj.map(m.MAP_BACKEND_STATS).set_max_entries(m.MAX_BACKENDS * max_services)
            program = self._obj.program(m.PROGRAM)
            program.capture_log(size=1 << 20, level=0)  # level 0: the log is filled only on failure
            try:
                self._obj.load()
            except libbpf.LibbpfError as exc:
                raise libbpf.LibbpfError(exc.errno, f"{exc.strerror}\n{program.log[-4000:]}") from None
            self.prog_fd = program.fd
            self.fds = {name: self._obj.map(name).fd for name in m.MAPS}
            self.ncpus = libbpf.num_possible_cpus()
            self.conn_capacity = conn_capacity
            self.image = MapImage(table_size, max_services)
            """What the maps hold (planner.MapImage), after the last sync()."""
            # For counters.connection_evictions: entries this instance did not see the program insert
            # (live in a reused rr_conns at start, written by write_connection), entries Python removed,
            # and conn_insert counts zeroed by counters.reset.
            reused = reuse_conns_fd is not None or reuse_conns6_fd is not None
            self.conn_baseline = self.count_connections() if reused else 0
            self.conn_deleted = 0
            self.conn_inserts_reset = 0
            self._cache_gen = 0  # rr_cache_gen[0] as loaded, without its RR_FLOW_CACHE_OFF bit
            self._cache_on = True
        except BaseException:
            self._obj.close()
            raise
        self._attached: tuple[int, int] | None = None  # (ifindex, mode flags)
        self._netns_fd: int | None = None              # the namespace of the attached interface
        self.replaced_program_id = 0
        """A program attach() replaced (a leftover of an earlier run, or a handover's)."""

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self, detach: bool = True) -> None:
        """Release the object; detach first unless `detach` is False (a handover: the program stays
        attached, holding its maps, until a successor replaces it)."""
        if detach and self._attached is not None:
            self.detach()
        self._forget_attachment()
        self._obj.close()

    def __enter__(self) -> XdpProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def max_table_size(self) -> int:
        return self.image.table_stride

    @property
    def max_services(self) -> int:
        return self.image.max_services

    # -- the maps ---------------------------------------------------------------------------------

    def sync(self, desired: Desired) -> list[Write]:
        """Make the maps hold `desired` (planner.plan, then its writes in order); the writes made.
        Raises ValueError, with the maps untouched, when they cannot hold it."""
        writes, image = plan(desired, self.image)
        self.write(writes)
        self.image = image
        return writes

    def adopt(self, backends_fd: int) -> dict[int, int]:
        """Take a handover predecessor's backend indices (its pinned rr_backends), so the connection
        entries it wrote stay valid here. Before the first sync(). Returns {index: address}."""
        taken = read_backend_indices(backends_fd)
        self.image = adopt(self.image, taken)
        return taken

    def write(self, writes: Sequence[Write]) -> None:
        """Execute writes in order (planner.Write: a key holding several keys is a batch), then retire
        the CPUs' flow cache copies made before them."""
        try:
            self._execute(writes)
        finally:
            if writes:
                self.retire_flow_cache()

    def retire_flow_cache(self) -> None:
        """Bump rr_cache_gen after a change to the maps: from then on no CPU uses a copy of a connection
        entry made before it (bpf/rr_flow_cache.h). A handover successor's writes to the maps it shares
        (rr_conns, rr_conns6, rr_backends) do not bump its predecessor's: until replaced, the old program
        may still use a copy made in the current tick (4 ms at most, at HZ=250)."""
        self._cache_gen += 1
        value = self._cache_gen | (0 if self._cache_on else m.FLOW_CACHE_OFF)
        libbpf.map_update(self.fds[m.MAP_CACHE_GEN], ctypes.c_uint32(0), ctypes.c_uint64(value))

    def use_flow_cache(self, on: bool) -> None:
        """Turn the CPUs' flow cache on (as loaded) or off (benchmarks: the rr_conns path alone)."""
        self._cache_on = on
        self.retire_flow_cache()

    def _execute(self, writes: Sequence[Write]) -> None:
        for w in writes:
            fd = self.fds[w.map]
            if w.value is None:
                libbpf.map_delete(fd, w.key)
                continue
            value = w.value
            n = len(w.key) // m.KEY_SIZES[w.map]
            if w.map in m.PERCPU_MAPS:  # the value for every CPU
                size = len(value) // n
                value = b"".join(value[i * size:(i + 1) * size] * self.ncpus for i in range(n))
            if n == 1:
                libbpf.map_update(fd, w.key, value)
                continue
            try:
                libbpf.map_update_batch(fd, w.key, value, n)
            except libbpf.LibbpfError:  # kernels without batch ops on arrays: one by one
                k, v = len(w.key) // n, len(value) // n
                for i in range(n):
                    libbpf.map_update(fd, w.key[i * k:(i + 1) * k], value[i * v:(i + 1) * v])

    def lookup(self, name: str, key: bytes | ctypes.Structure, value_size: int) -> bytes | None:
        """One map value (per-CPU maps: every CPU's, `value_size` in all), None when absent."""
        return libbpf.map_lookup(self.fds[name], key, value_size)

    def read_config(self) -> m.RrConfig:
        return m.RrConfig.from_buffer_copy(self.lookup(m.MAP_CONFIG, ctypes.c_uint32(0), ctypes.sizeof(m.RrConfig)))

    def read_backend(self, index: int) -> m.RrBackend:
        raw = self.lookup(m.MAP_BACKENDS, ctypes.c_uint32(index), ctypes.sizeof(m.RrBackend))
        return m.RrBackend.from_buffer_copy(raw)

    def read_table(self, service_index: int, size: int) -> list[int]:
        """`size` slots of the table of the service with that index, as rr_maglev holds them."""
        start = service_index * self.max_table_size
        return [int.from_bytes(self.lookup(m.MAP_MAGLEV, ctypes.c_uint32(start + i), 4), sys.byteorder)
                for i in range(size)]

    def service_entries(self) -> dict[bytes, tuple[int, int, int]]:
        """rr_services and rr_services6 as the kernel holds them: lookup entry (8 or 20 bytes) ->
        (service index, table size, option flags)."""
        out = {}
        for name in (m.MAP_SERVICES, m.MAP_SERVICES6):
            fd = self.fds[name]
            for key in libbpf.map_keys(fd, m.KEY_SIZES[name]):
                raw = libbpf.map_lookup(fd, key, ctypes.sizeof(m.RrService))
                if raw is not None:
                    value = m.RrService.from_buffer_copy(raw)
                    out[key] = (value.index, value.table_size, value.flags)
        return out

    # -- the connection tables (rr_conns: IPv4 keys, rr_conns6: IPv6 keys) --------------------------

    def connection(self, key: bytes) -> XdpConnection | None:
        raw = self.lookup(m.conn_map(key), key, ctypes.sizeof(m.RrConn))
        if raw is None:
            return None
        conn = m.RrConn.from_buffer_copy(raw)
        return XdpConnection(key, as_address(m.from_identity(bytes(conn.backend_addr))), conn.backend_index,
                             conn.last_seen_ns, conn.flow_hash)

    def connections(self) -> list[XdpConnection]:
        keys = [k for name in m.CONN_MAPS for k in libbpf.map_keys(self.fds[name], m.KEY_SIZES[name])]
        return [c for c in (self.connection(k) for k in keys) if c is not None]

    def count_connections(self) -> int:
        return sum(n for name in m.CONN_MAPS
                   for n, _, _ in libbpf.map_lookup_batches(self.fds[name], m.KEY_SIZES[name], ctypes.sizeof(m.RrConn)))

    def write_connection(self, key: bytes, backend: AddressLike, last_seen_ns: int,
                         index: int | None = None) -> None:
        """Write an entry by hand (tests: stickiness, timeouts); `index` defaults to the backend's."""
        address = address_int(backend)
        conn = m.RrConn(backend_index=self.image.backend_index[address] if index is None else index,
                        flow_hash=flow_hash(key, self.image.config.hash_seed if self.image.config else RR_HASH_SEED),
                        last_seen_ns=last_seen_ns)
        conn.backend_addr = (ctypes.c_uint8 * 16)(*m.identity(address))
        new = self.connection(key) is None
        libbpf.map_update(self.fds[m.conn_map(key)], key, conn)
        self.retire_flow_cache()
        if new:
            self.conn_baseline += 1  # an entry the program did not insert (connection_evictions)

    def delete_connection(self, key: bytes) -> bool:
        """Forget one flow (benchmarks: force the next packet of it to miss). True if it was there."""
        deleted = libbpf.map_delete(self.fds[m.conn_map(key)], key)
        self.retire_flow_cache()
        self.conn_deleted += int(deleted)
        return deleted

    def clear_connections(self) -> int:
        deleted = 0
        for name in m.CONN_MAPS:
            fd = self.fds[name]
            deleted += sum(libbpf.map_delete(fd, k) for k in libbpf.map_keys(fd, m.KEY_SIZES[name]))
        self.retire_flow_cache()
        self.conn_deleted += deleted
        return deleted

    # -- running the program ----------------------------------------------------------------------

    def test_run(self, frame: bytes) -> tuple[XdpAction, bytes]:
        """Run the program once on `frame` (BPF_PROG_TEST_RUN): (action, the frame as it left).
        The kernel refuses frames shorter than an Ethernet header (14 bytes) with EINVAL."""
        action, out, _ = libbpf.prog_test_run(self.prog_fd, frame, repeat=1)
        return XdpAction(action), out

    def test_run_timed(self, frame: bytes, repeat: int) -> tuple[XdpAction, bytes, int]:
        """Run `repeat` times in the kernel: (action, output, average ns per run).

        For benchmarks: the kernel does not restore the frame between repetitions, so after a forward
        (XDP_TX) every later run processes the previous output, itself a plain GRE frame of the same
        flow (no GRE options or checksum: a connection-table hit). Drops and passes are unaffected."""
        action, out, duration = libbpf.prog_test_run(self.prog_fd, frame, repeat=repeat)
        return XdpAction(action), out, duration

    # -- attaching --------------------------------------------------------------------------------

    def attach(self, interface: str | int, mode: str = "native",
               may_replace: Callable[[int], None] | None = None) -> None:
        """Attach to `interface` (name or ifindex, in this thread's namespace) in "native" or "skb"
        (generic) mode. A program running there in that mode is replaced atomically, XDP_FLAGS_REPLACE
        with its fd, so the device is never without a program; replaced_program_id names it.
        `may_replace(fd)`, when given, is asked first about exactly the program the kernel will replace (the
        same fd goes to XDP_FLAGS_REPLACE) and raises to refuse (the engine: only ours, hook.py); without
        it anyone's is replaced. Never detach-then-attach: a program running in the other mode cannot be
        replaced so, and is refused (OSError EEXIST; see running_mode())."""
        ifindex, flags = _ifindex(interface), _MODES[mode]
        for _ in range(3):  # the running program may change between the query and the attach
            running = libbpf.xdp_query_id(ifindex, flags)
            if running == 0:
                other = libbpf.xdp_query_id(ifindex, 0)
                if other:
                    raise OSError(errno.EEXIST, f"XDP program {other} runs on {interface} in another mode than "
                                                f"{mode}; it cannot be replaced without a gap")
                try:
                    libbpf.xdp_attach(ifindex, self.prog_fd, flags | libbpf.XDP_FLAGS_UPDATE_IF_NOEXIST)
                except OSError as exc:
                    if exc.errno in (errno.EBUSY, errno.EEXIST):
                        continue  # one was attached meanwhile: replace that one
                    raise
            else:
                try:
                    old_fd = libbpf.prog_get_fd_by_id(running)
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        continue  # gone meanwhile
                    raise
                try:
                    if may_replace is not None:
                        may_replace(old_fd)
                    libbpf.xdp_attach(ifindex, self.prog_fd, flags, old_prog_fd=old_fd)
                except OSError as exc:
                    if exc.errno == errno.EEXIST:
                        continue  # another one meanwhile
                    raise
                finally:
                    os.close(old_fd)
            self.replaced_program_id = running
            break
        else:
            raise OSError(errno.EBUSY, f"the XDP program on {interface} kept changing while attaching")
        self._attached = (ifindex, flags)
        # An ifindex means something only in its namespace: remember which one, so that detach()
        # never acts on an interface of another namespace (e.g. the host's) with the same number.
        self._netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def detach(self) -> None:
        """Remove the program from the interface it was attached to, from any network namespace."""
        if self._attached is None:
            return
        (ifindex, flags), self._attached = self._attached, None
        netns_fd, self._netns_fd = self._netns_fd, None
        try:
            with in_netns(netns_fd):
                libbpf.xdp_detach(ifindex, flags)
        except OSError as exc:
            if exc.errno != errno.ENODEV:  # the interface is already gone: nothing to detach
                raise
        finally:
            if netns_fd is not None:
                os.close(netns_fd)

    @property
    def attached_ifindex(self) -> int | None:
        return self._attached[0] if self._attached else None

    def pin(self, directory: str) -> None:
        """Pin what a successor needs in `directory` (on a bpffs): rr_backends (which index names which
        backend, for adopt()), rr_conns6 and rr_conns (the flows' backends), rr_conns last: its pin says
        the pins are complete. Nothing else changes: the program stays attached and this instance keeps
        serving. On failure the pins made are removed again and OSError raised."""
        os.makedirs(directory, exist_ok=True)
        made: list[str] = []
        try:
            for name in (m.MAP_BACKENDS, m.MAP_CONNS6, m.MAP_CONNS):
                path = os.path.join(directory, name)
                if os.path.lexists(path):
                    os.unlink(path)  # a stale pin of an earlier handover nobody took over
                libbpf.obj_pin(self.fds[name], path)
                made.append(path)
        except OSError:
            for path in made:
                os.unlink(path)
            raise

    def unpin(self, directory: str) -> None:
        """Remove what pin() made (an undone handover; idempotent)."""
        for name in (m.MAP_CONNS, m.MAP_CONNS6, m.MAP_BACKENDS):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(directory)
        except OSError:
            pass  # not empty, or gone

    def _forget_attachment(self) -> None:
        self._attached = None
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None
