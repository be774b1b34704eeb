"""`AfPacketEngine`: rusty_rail.dataplane.Engine over TPACKET_V3 rings, in pure Python.

    engine = AfPacketEngine(EngineOptions("eth1", workers=2))
    engine.apply(state)          # before start(): every worker starts with it
    engine.start()               # rings open, workers forked, GRE kept from the host stack
    report = engine.serve(stop)  # until stop is set; then everything is let go

workers = 1: the worker runs in this process, in the thread that calls serve(); apply(), counters() and
explain() reach its Balancer directly from the control plane's threads (local.py says why that is safe).
workers > 1: forked workers (pool.py); apply() sends each only the services that changed, counters() adds
their answers up, and explain() prefers the worker that holds the flow's connection entry.

The host's stack never sees the balanced GRE: hostfilter.install() drops it at netdev ingress, which runs
after the AF_PACKET taps. It is installed once every worker listens, and removed when the engine stops.

Frames the device refused to transmit after the TX ring or the spill socket took them (veth: its peer
could not take them) are counted here, once for all workers, from the device (engines/device.py) as
tx_refused drops, and taken out of `forwarded`; forwards no TX path took at all are the workers'
tx_failed drops.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

from rusty_rail.core.balancer import explain_choice
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import Service, ServiceKey, ServiceMatcher
from rusty_rail.core.verdict import DropReason
from rusty_rail.dataplane import (
    Counters,
    DataplaneState,
    EngineError,
    EngineKind,
    EngineOptions,
    EngineReport,
    Explanation,
)
from rusty_rail.engines.afpacket import hostfilter
from rusty_rail.engines.afpacket.bulk import bulk_blocks
from rusty_rail.engines.afpacket.local import merge_counters
from rusty_rail.engines.afpacket.pool import WorkerPool
from rusty_rail.engines.afpacket.walker import ProcessorFactory
from rusty_rail.engines.afpacket.worker import Worker
from rusty_rail.engines.device import TxRefusals
from rusty_rail.engines.neighbours import DeviceError, DeviceInfo, device_info


class AfPacketEngine:
    """The pure-Python engine. Keyword arguments beyond `options` are for tests and benchmarks:
    `processor` replaces the per-block processing (walker.py's seam), `ring_options` the ring sizes."""

    kind = EngineKind.AFPACKET

    def __init__(
        self,
        options: EngineOptions,
        *,
        processor: ProcessorFactory = bulk_blocks,
        ring_options: dict[str, Any] | None = None,
        host_filter: bool = True,
        neighbour_interval: float = 1.0,
        poll_ms: int = 100,
    ) -> None:
        if options.workers < 1:
            raise ValueError("workers must be >= 1")
        self.options = options
        self.processor = processor
        self.ring_options = ring_options
        self.host_filter = host_filter
        self.neighbour_interval = neighbour_interval
        self.poll_ms = poll_ms
        self._state = DataplaneState()
        self._lock = threading.Lock()
        """Serialises apply() with start() and with itself: what the workers hold is `_sent`."""
        self._sent: dict[ServiceKey, Service] = {}
        self._services_sent = 0
        self._worker: Worker | None = None
        self._pool: WorkerPool | None = None
        self._filtered = False
        self._refusals: TxRefusals | None = None
        self._ready = threading.Event()
        self._final: Counters | None = None
        self._device: DeviceInfo | None = None
        """The device as start() found it: its addresses decide which backends apply() may take."""

    # -- state ---------------------------------------------------------------------------------------

    def apply(self, state: DataplaneState) -> None:
        with self._lock:
            if self._device is not None:  # started: a backend needs an address of its family to send from
                try:
                    self._device.check_backends({int(b) for s in state.services for b in s.backends},
                                                self.options.device)
                except DeviceError as exc:
                    raise ValueError(str(exc)) from None
            self._state = state
            if self._worker is not None:
                self._worker.local.apply(state.services)
            elif self._pool is not None:
                wanted = state.by_key()
                changed = tuple(s for key, s in wanted.items() if self._sent.get(key) != s)
                removed = tuple(key for key in self._sent if key not in wanted)
                if changed or removed:
                    self._pool.ask(("apply", changed, removed))
                    self._services_sent += len(changed) * self.options.workers
                self._sent = wanted

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._worker is not None or self._pool is not None:
            return
        device = self.options.device
        # DeviceError (an EngineError) naming the device, before anything is set up: no such device, no
        # address, or none of a backend's family (docs/WIRE.md section 8).
        info = device_info(device)
        info.check_backends({int(b) for s in self._state.services for b in s.backends}, device)
        try:
            self._refusals = TxRefusals(device)
            if self.options.workers == 1:
                with self._lock:
                    self._worker = self._make_worker(self._state.services, None, None)
            else:
                fanout_group = os.getpid() & 0xFFFF
                # The children are forked with `_state`, and apply() sends the changes from it on; it
                # waits meanwhile (the lock), so a change made while the workers start is not lost.
                with self._lock:
                    services = self._state.services
                    self._sent = {s.key: s for s in services}
                    self._pool = WorkerPool(self.options.workers,
                                            lambda control: self._make_worker(services, fanout_group, control))
                    self._pool.start()
        except PermissionError as exc:
            self.close()
            raise EngineError(f"AF_PACKET on {device} needs CAP_NET_RAW (run as root): {exc}") from exc
        except OSError as exc:
            self.close()
            raise EngineError(f"AF_PACKET rings on {device} could not be set up: {exc}") from exc
        except BaseException:
            self.close()
            raise
        if self.host_filter:
            try:
                hostfilter.install(device)
            except (OSError, RuntimeError, ValueError) as exc:
                self.close()
                raise EngineError(f"cannot keep the balanced GRE from the host stack on {device}: {exc}") from exc
            self._filtered = True
        self._device = info
        self._ready.set()

    def _make_worker(self, services: tuple[Service, ...], fanout_group: int | None, control: Any) -> Worker:
        return Worker(self.options.device, services, self.options.connection_capacity, self.processor,
                      ring_options=self.ring_options, fanout_group=fanout_group,
                      neighbour_interval=self.neighbour_interval, poll_ms=self.poll_ms, control=control)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def serve(self, stop: threading.Event) -> EngineReport:
        """One worker: the packet loop runs here. Several: watch them (a dead one stops the engine)."""
        self.start()
        try:
            if self._worker is not None:
                self._worker.loop(stop.is_set)
            else:
                assert self._pool is not None
                while not stop.wait(0.2):
                    dead = self._pool.dead()
                    if dead:
                        raise EngineError(f"AF_PACKET worker {dead[0]} died; stopping the others")
        finally:
            self.close()
        return EngineReport(self.kind, False, self.counters())

    def hand_over(self, pin_root: str) -> bool:
        """Nothing to leave running (the rings close with the process): a handover's stop is a plain one."""
        return False

    def cancel_handover(self) -> None:
        pass

    def close(self) -> None:
        """Stop the workers, close the rings, remove the host filter; the last counters are kept."""
        self._ready.clear()
        with self._lock:
            worker, pool = self._worker, self._pool
            self._worker = self._pool = None
        if worker is not None:
            self._final = self._with_device(worker.counters(ready=False))
            worker.close()
        if pool is not None:
            finals = pool.stop()
            if finals:
                self._final = self._with_device(self._with_supervisor(merge_counters(finals, ready=False)))
        if self._filtered:
            self._filtered = False
            hostfilter.remove(self.options.device)
        self._device = None
        if self._refusals is not None:
            self._refusals.close()
            self._refusals = None

    # -- inspection ----------------------------------------------------------------------------------

    def counters(self, *, walk: bool = True) -> Counters:
        worker, pool = self._worker, self._pool
        if worker is not None:
            return self._with_device(worker.counters(self.ready, walk))
        if pool is not None:
            return self._with_device(self._with_supervisor(merge_counters(pool.ask(("counters", walk)), self.ready)))
        return self._final if self._final is not None else Counters()

    def _with_device(self, counters: Counters) -> Counters:
        """Adds what only the device knows: frames it refused to transmit (tx_refused), which the workers
        counted as forwarded."""
        refusals = self._refusals
        refused = refusals.read() if refusals is not None else 0
        drops = {**counters.drops, DropReason.TX_REFUSED.name.lower(): refused}
        forwarded = max(0, counters.forwarded - refused)
        return dataclasses.replace(counters, forwarded=forwarded, drops=drops,
                                   forwarded_ipv6=min(counters.forwarded_ipv6, forwarded))  # not traced to a family

    def _with_supervisor(self, counters: Counters) -> Counters:
        """Adds what only the supervisor knows: services it shipped to the workers."""
        return dataclasses.replace(counters, engine={**counters.engine, "services_sent": self._services_sent})

    def explain(self, key: FlowKey) -> Explanation:
        worker, pool = self._worker, self._pool
        if worker is not None:
            return worker.local.explain(key)
        if pool is not None:
            answers: list[Explanation] = pool.ask(("explain", key))
            # Only the worker that owns the flow has its connection entry; the table slot is the same in all.
            return next((a for a in answers if a.reason == "connection entry"), answers[0])
        # Not running: no connection table, so the table decides (the rule: core.balancer.explain_choice).
        packed = key.packed
        service = ServiceMatcher(self._state.by_key()).match(packed)
        backend, reason = explain_choice(service, packed, None)
        return Explanation(backend, reason)
