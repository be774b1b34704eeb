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
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from rusty_rail.core.balancer import Balancer
from rusty_rail.engines.neighbours import NeighbourResolver
from rusty_rail.engines.xdp import XdpBalancer, default_object_path
from rusty_rail.engines.xdp_maps import DEFAULT_MAX_SERVICES

__all__ = ["XdpEngine", "xdp_available"]

log = logging.getLogger("rusty_rail.xdp")


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
    ) -> None:
        self.device = device
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

    def _run(self, stop: threading.Event) -> dict[str, int]:
        balancer = self.balancer_factory()
        # The connection table's bound follows the Python one, so both engines behave alike.
        capacity = self.conn_capacity or balancer.connections.capacity
        resolver = NeighbourResolver(self.device)
        try:
            max_services = self.max_services or (1 if balancer.pool is not None else DEFAULT_MAX_SERVICES)
            xdp = XdpBalancer(self.object_path, table_size=balancer.table_size, conn_capacity=capacity,
                              pin_dir=self.pin_dir, max_services=max_services)
        except BaseException:
            resolver.close()
            raise
        self.balancer, self.xdp = balancer, xdp
        sink = _Sink(balancer, xdp)
        try:
            with self._lock:
                xdp.sync_from_balancer(balancer)
            # Resolve once before attaching, so known next hops forward from the first packet.
            self._refresh(resolver, sink)
            xdp.attach(self.device, mode=self.mode)
            self.replaced_program_id = xdp.replaced_program_id
            if self.replaced_program_id:
                log.warning("replaced XDP program id %d left on %s by an earlier run",
                            self.replaced_program_id, self.device)
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
            try:
                xdp.close()  # detaches (from the namespace it attached in) and unpins
            finally:
                resolver.close()
                self._remove_pin_dir()
                log.info("XDP engine stopped on %s: detached", self.device)

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
