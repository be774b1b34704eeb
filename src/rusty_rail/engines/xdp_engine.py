"""The runtime engine for RR_ENGINE=xdp: the XDP program decides per packet in the kernel; this
process is only its control plane.

    engine = XdpEngine("eth0", lambda: Balancer(address, mac, backends))
    engine.serve_forever()        # until SIGTERM / SIGINT (or stop.set() when given a stop event)

What it does, in order: builds the Balancer (the Maglev table is built in Python, never in the
kernel), loads bpf/xdp_balancer.o, copies the balancer's address, MAC, table and backends into the
maps, attaches natively to the device (replacing a program a crashed run left there), then keeps the
backends' next-hop MACs current from the kernel's neighbour table: every `neighbour_interval`
seconds, and every `resolving_interval` while some backend is unresolved (its flows are dropped as
NO_NEIGHBOUR meanwhile). On stop it detaches and removes any pins, whatever happened in between.

Hitless restart (handover): `request_handover()` then stop. Instead of detaching, the engine pins
rr_conns and rr_backends in `handover_dir` (a well-known bpffs directory per namespace and device, see
`handover_dir()`) and exits with the program still attached: it keeps forwarding on its (now frozen)
maps. The next engine started with the same `handover_dir` finds the pins, loads its program with the
pinned rr_conns as its own connection table (bpf_map__reuse_fd), takes the backend indices the entries
name from the pinned rr_backends, fills its other maps, and only then replaces the running program
atomically (XDP_FLAGS_REPLACE with the old program's fd): the device is never without a program and
every established flow keeps its entry, so its backend. It then removes the pins. A plain stop still
detaches and unpins; a killed run's leftover program is still replaced on the next start.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from rusty_rail.core.balancer import Balancer
from rusty_rail.engines.neighbours import NeighbourResolver
from rusty_rail.engines.xdp import XdpBalancer, default_object_path
from rusty_rail.bpf import libbpf
from rusty_rail.engines.xdp_maps import DEFAULT_MAX_SERVICES, MAP_BACKENDS, MAP_CONNS

__all__ = ["HANDOVER_ROOT", "XdpEngine", "handover_dir", "xdp_available"]

log = logging.getLogger("rusty_rail.xdp")

HANDOVER_ROOT = "/sys/fs/bpf/rusty_rail"
"""Where handovers pin their maps (a directory per network namespace and device below it)."""


def handover_dir(device: str, root: str = HANDOVER_ROOT) -> str:
    """The handover pin directory of `device` in this thread's network namespace: root/<netns inode>-<device>.
    bpffs is one per host while device names repeat across namespaces, hence the namespace's inode."""
    return os.path.join(root, f"{os.stat('/proc/thread-self/ns/net').st_ino}-{device}")


class _Predecessor:
    """What a handover left: the pinned maps and the program attached now (fds, closed by close())."""

    def __init__(self, directory: str, device: str) -> None:
        self.directory = directory
        self.conns_fd = libbpf.obj_get(os.path.join(directory, MAP_CONNS))
        self.backends_fd: int | None = None
        self.prog_fd: int | None = None
        self.prog_id = 0
        try:
            self.backends_fd = libbpf.obj_get(os.path.join(directory, MAP_BACKENDS))
            self.prog_id = libbpf.xdp_query_id(socket.if_nametoindex(device), 0)
            if self.prog_id:
                self.prog_fd = libbpf.prog_get_fd_by_id(self.prog_id)
        except BaseException:
            self.close()
            raise

    def remove_pins(self) -> None:
        for name in (MAP_CONNS, MAP_BACKENDS):
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass
        for d in (self.directory, os.path.dirname(self.directory)):
            try:
                os.rmdir(d)  # only when empty: another device's handover may be pending
            except OSError:
                break

    def close(self) -> None:
        for fd in (self.conns_fd, self.backends_fd, self.prog_fd):
            if fd is not None:
                os.close(fd)
        self.conns_fd = self.backends_fd = self.prog_fd = None  # type: ignore[assignment]


def xdp_available(object_path: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Can the XDP program be loaded here? (yes/no, and why) — for RR_ENGINE=auto.

    Loading is the honest test: it needs the compiled object, privileges (CAP_BPF/CAP_SYS_ADMIN), a
    kernel with the helpers we use and a verifier that accepts the program. Native XDP on the device
    itself is checked only when attaching (veth and most drivers support it).
    """
    path = Path(object_path) if object_path is not None else default_object_path()
    if not path.exists():
        return False, f"{path.name} is not built (run `make bpf`)"
    try:
        # Small maps: this is a probe, it must not allocate the production connection table.
        with XdpBalancer(path, table_size=251, conn_capacity=64, max_services=1):
            pass
    except OSError as exc:  # LibbpfError is an OSError; EPERM without privileges
        first = (exc.strerror or str(exc)).splitlines()[0]
        return False, f"the XDP program does not load here: {first}"
    return True, f"the XDP program loads here (kernel {os.uname().release})"


class _Sink:
    """NeighbourResolver's sink: a next hop's MAC goes to the Balancer and the rr_backends map alike,
    so the Python state stays a faithful mirror of the kernel's (explain(), counters, re-syncs)."""

    def __init__(self, balancer: Balancer, xdp: XdpBalancer) -> None:
        self.balancer = balancer
        self.xdp = xdp

    def set_neighbour(self, backend: int, mac: bytes | None) -> None:
        self.balancer.set_neighbour(backend, mac)
        self.xdp.set_neighbour(backend, mac)
        log.info("next hop of %s: %s", _ip(backend), mac.hex(":") if mac else "unresolved")


def _ip(n: int) -> str:
    return ".".join(str((n >> s) & 0xFF) for s in (24, 16, 8, 0))


class XdpEngine:
    """Runs the XDP data plane on `device` (in the caller's network namespace) until stopped."""

    def __init__(
        self,
        device: str,
        balancer_factory: Callable[[], Balancer],
        *,
        object_path: str | os.PathLike | None = None,
        mode: str = "native",
        conn_capacity: int | None = None,
        pin_dir: str | None = None,
        neighbour_interval: float = 1.0,
        resolving_interval: float = 0.1,
        max_services: int | None = None,
        handover_dir: str | None = None,
    ) -> None:
        self.device = device
        self.handover_dir = handover_dir
        """Where a handover pins its maps and where a start looks for a predecessor's (None: no handovers)."""
        self.balancer_factory = balancer_factory
        self.object_path = object_path
        self.mode = mode
        self.conn_capacity = conn_capacity
        self.pin_dir = pin_dir
        self.neighbour_interval = neighbour_interval
        self.resolving_interval = resolving_interval
        self.max_services = max_services
        """Services the program can hold (services mode); None: 1 for an open-mode balancer (its mode
        is fixed when it is built), else xdp_maps.DEFAULT_MAX_SERVICES."""
        self.balancer: Balancer | None = None
        self.xdp: XdpBalancer | None = None
        self.replaced_program_id = 0
        """The id of a program a previous (crashed) run left on the device, which we replaced."""
        self.ready = threading.Event()
        """Set once the program is attached and the first neighbour refresh ran."""
        self.resolved = threading.Event()
        """Set while every backend's next hop is known (cleared when one becomes unknown)."""
        self._lock = threading.Lock()  # sync() may come from another thread (control plane)
        self._handover = False
        self.handed_over = False
        """Set when the run ended in a handover (program left attached, maps pinned)."""
        self.took_over_program_id = 0
        """The id of the predecessor's program this run replaced atomically (0: it did not take over)."""
        self.adopted_connections = False
        """Whether this run's connection table is its predecessor's (rr_conns reused)."""

    def request_handover(self) -> None:
        """Make the next stop a handover (safe from a signal handler: sets a flag; the caller stops)."""
        self._handover = True

    # -- running ----------------------------------------------------------------------------------

    def serve_forever(self, stop: threading.Event | None = None) -> dict[str, int]:
        """Serve until `stop` is set, or, without one, until SIGTERM/SIGINT (handlers are installed
        only in the main thread; elsewhere the caller must pass `stop`). Returns the final counters."""
        own_signals = stop is None and threading.current_thread() is threading.main_thread()
        if stop is None:
            if not own_signals:
                raise ValueError("serve_forever() outside the main thread needs a stop event")
            stop = threading.Event()
        previous = {}
        if own_signals:
            previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run(stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _find_predecessor(self) -> _Predecessor | None:
        d = self.handover_dir
        if d is None or not os.path.exists(os.path.join(d, MAP_CONNS)):
            return None
        try:
            return _Predecessor(d, self.device)
        except OSError as exc:
            log.warning("handover pins in %s are unusable (%s): starting afresh", d, exc)
            return None

    def _run(self, stop: threading.Event) -> dict[str, int]:
        balancer = self.balancer_factory()
        # The connection table's bound follows the Python one, so both engines behave alike.
        capacity = self.conn_capacity or balancer.connections.capacity
        resolver = NeighbourResolver(self.device)
        before = self._find_predecessor()
        try:
            max_services = self.max_services or (1 if balancer.pool is not None else DEFAULT_MAX_SERVICES)

            def load(reuse: int | None) -> XdpBalancer:
                return XdpBalancer(self.object_path, table_size=balancer.table_size, conn_capacity=capacity,
                                   pin_dir=self.pin_dir, max_services=max_services, reuse_conns_fd=reuse)

            xdp = None
            if before is not None:
                try:
                    xdp = load(before.conns_fd)
                    self.adopted_connections = True
                except ValueError as exc:  # e.g. another connection capacity: flows are re-hashed
                    log.warning("not reusing the predecessor's connection table: %s", exc)
            if xdp is None:
                xdp = load(None)
        except BaseException:
            resolver.close()
            if before is not None:
                before.close()
            raise
        self.balancer, self.xdp = balancer, xdp
        sink = _Sink(balancer, xdp)
        try:
            if before is not None and self.adopted_connections and before.backends_fd is not None:
                xdp.adopt_backend_indices(before.backends_fd)
            with self._lock:
                xdp.sync_from_balancer(balancer)
            # Resolve once before attaching, so known next hops forward from the first packet.
            self._refresh(resolver, sink)
            self._attach(xdp, before)
            if before is not None:
                before.close()  # the old program is gone from the device; its maps live on in ours
            if balancer.pool is not None:
                log.info("XDP engine attached (%s) on %s: %d backends, table of %d slots", self.mode,
                         self.device, len(balancer.table.backends), len(balancer.table.slots))
            else:
                log.info("XDP engine attached (%s) on %s: %d services, %d backends", self.mode, self.device,
                         len(balancer.services), len(balancer.backends))
            self.ready.set()
            while not stop.is_set():
                unresolved = self._refresh(resolver, sink)
                stop.wait(self.resolving_interval if unresolved else self.neighbour_interval)
            return xdp.counters()
        finally:
            self.ready.clear()
            if before is not None:
                before.close()
            try:
                if self._handover and self.handover_dir is not None and xdp.attached_ifindex is not None:
                    try:
                        xdp.hand_over(self.handover_dir)
                        self.handed_over = True
                    except OSError as exc:
                        log.error("handover failed, detaching instead: %s", exc)
                xdp.close()  # detaches (from the namespace it attached in) and unpins; not after a handover
            finally:
                resolver.close()
                self._remove_pin_dir()
                if self.handed_over:
                    log.info("XDP engine handed over on %s: program %d stays attached, connection table "
                             "pinned in %s", self.device, libbpf.xdp_query_id(socket.if_nametoindex(self.device), 0),
                             self.handover_dir)
                else:
                    log.info("XDP engine stopped on %s: detached", self.device)

    def _attach(self, xdp: XdpBalancer, before: _Predecessor | None) -> None:
        if before is not None and before.prog_fd is not None:
            try:
                xdp.attach(self.device, mode=self.mode, replace_fd=before.prog_fd)
            except OSError as exc:  # another program meanwhile, another mode: the ordinary way
                log.warning("atomic replacement of program %d failed (%s): replacing it the ordinary way",
                            before.prog_id, exc)
            else:
                self.took_over_program_id = before.prog_id
                before.remove_pins()
                log.info("took over from program %d on %s without a gap: %s connection table", before.prog_id,
                         self.device, "its" if self.adopted_connections else "a new")
                return
        xdp.attach(self.device, mode=self.mode)
        if before is not None:
            before.remove_pins()
        self.replaced_program_id = xdp.replaced_program_id
        if self.replaced_program_id:
            log.warning("replaced XDP program id %d left on %s by an earlier run",
                        self.replaced_program_id, self.device)

    def _refresh(self, resolver: NeighbourResolver, sink: _Sink) -> int:
        """One neighbour pass; returns how many backends are still unresolved."""
        assert self.balancer is not None
        with self._lock:
            backends = sorted(self.balancer.backends)
            resolver.refresh(backends, sink)
        unresolved = sum(1 for b in backends if self.balancer.neighbour(b) is None)
        if unresolved:
            self.resolved.clear()
        else:
            self.resolved.set()
        return unresolved

    def _remove_pin_dir(self) -> None:
        if self.pin_dir is None:
            return
        try:
            os.rmdir(self.pin_dir)  # only if empty: never remove pins that are not ours
        except OSError:
            pass

    # -- control plane ----------------------------------------------------------------------------

    def sync(self) -> None:
        """Copy the balancer's current tables and backends into the maps (after balancer.set_backends,
        set_service or remove_service)."""
        with self._lock:
            if self.balancer is not None and self.xdp is not None:
                self.xdp.sync_from_balancer(self.balancer)

    def counters(self) -> dict[str, int]:
        return self.xdp.counters() if self.xdp is not None else {}

    def backend_stats(self) -> dict:
        """XdpBalancer.backend_stats(), consistent with the last sync ({} before the program loads)."""
        with self._lock:
            return self.xdp.backend_stats() if self.xdp is not None else {}

    def connection_summary(self, flow_limit: int | None = None) -> tuple[int, dict | None]:
        """XdpBalancer.connection_summary() ((0, {}) before the program loads)."""
        xdp = self.xdp
        return xdp.connection_summary(flow_limit) if xdp is not None else (0, {})
