"""One AF_PACKET worker: a socket with its rings, a Balancer, next-hop resolution, and the packet loop.

The engine runs one in its own process (workers = 1) or one per forked process (workers > 1), each then
joined to a PACKET_FANOUT group and answering the supervisor's requests over a pipe.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any

from rusty_rail.core.balancer import Balancer
from rusty_rail.core.conntrack import ConnectionTable
from rusty_rail.core.service import Service, ServiceKey
from rusty_rail.core.verdict import DropReason
from rusty_rail.dataplane import Counters
from rusty_rail.engines.afpacket.cbpf import inner_flow_fanout_program
from rusty_rail.engines.afpacket.local import LocalBalancer
from rusty_rail.engines.afpacket.ring import PacketRing
from rusty_rail.engines.afpacket.walker import ProcessorFactory, RingStats, RingWalker
from rusty_rail.engines.neighbours import NeighbourResolver

NEIGHBOUR_SOON = 0.05
"""After a NO_NEIGHBOUR drop, resolve within this many seconds (not per packet, not a whole interval)."""
CONTROL_EVERY = 0.05
"""While busy, look at the supervisor's pipe this often (an idle worker wakes on it at once)."""

ApplyRequest = tuple[str, tuple[Service, ...], tuple[ServiceKey, ...]]
"""("apply", changed services, removed keys): what a forked worker receives on a change."""


class Worker:
    """Owns the device's socket for one packet loop. `loop()` runs until `stop()` is true."""

    def __init__(
        self,
        device: str,
        services: Iterable[Service],
        connection_capacity: int,
        processor: ProcessorFactory,
        *,
        ring_options: dict[str, Any] | None = None,
        fanout_group: int | None = None,
        neighbour_interval: float = 1.0,
        poll_ms: int = 100,
        control: Connection | None = None,
    ) -> None:
        self.device = device
        self.control = control
        """A pipe to the supervisor (forked workers only)."""
        self.neighbour_interval = neighbour_interval
        self.poll_ms = poll_ms
        self.neighbour_refreshes = 0
        self.resolver = NeighbourResolver(device)  # raises DeviceError: missing device, no IP address
        self.ring: PacketRing | None = None
        self.spill: socket.socket | None = None
        try:
            resolver = self.resolver
            balancer = Balancer(resolver.address, resolver.mac, services, ConnectionTable(connection_capacity),
                                local_address6=resolver.address6, mtu=resolver.mtu)
            self.local = LocalBalancer(balancer)
            self.ring = PacketRing(self.resolver.ifindex, **(ring_options or {}))
            if fanout_group is not None:
                self.ring.join_fanout(fanout_group, inner_flow_fanout_program())
            # Ring-less (protocol 0: it receives nothing): for forwards whose TX slot is still busy.
            self.spill = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self.spill.bind((device, 0))
            self.walker = RingWalker(self.ring, processor(balancer), self.spill,
                                     on_tx_failed=lambda: balancer.count_drop(DropReason.TX_FAILED))
        except BaseException:
            self.close()
            raise

    @property
    def balancer(self) -> Balancer:
        return self.local.balancer

    @property
    def stats(self) -> RingStats:
        return self.walker.stats

    def figures(self) -> dict[str, int]:
        """This worker's engine-only figures (Counters.engine); bulk_frames: frames the array path of
        bulk.py decided (the rest went through Balancer.decide)."""
        return {**self.stats.figures(), "neighbour_refreshes": self.neighbour_refreshes,
                "pools_built": self.local.pools_built, "workers": 1,
                "bulk_frames": getattr(self.walker.process, "bulk_frames", 0)}

    def counters(self, ready: bool, walk: bool = True) -> Counters:
        return self.local.counters(self.figures(), ready, walk)

    def refresh_neighbours(self) -> None:
        self.resolver.refresh(self.balancer.backends, self.balancer)
        self.neighbour_refreshes += 1

    def _housekeeping(self) -> None:
        self.refresh_neighbours()
        assert self.ring is not None
        self.stats.rx_kernel_drops += self.ring.statistics()[1]

    def loop(self, stop: Callable[[], bool]) -> None:
        """Receive, decide, forward until `stop()` is true (checked after every block, and at least every
        `poll_ms` while idle)."""
        ring, walker, control = self.ring, self.walker, self.control
        assert ring is not None
        step = walker.step
        drops = self.balancer.drops  # the list itself: set_services never replaces it
        monotonic = time.monotonic
        poller = select.poll()
        poller.register(ring.sock, select.POLLIN | select.POLLERR)
        if control is not None:
            poller.register(control.fileno(), select.POLLIN)  # a request wakes an idle worker
        self.refresh_neighbours()
        unresolved_seen = drops[DropReason.NO_NEIGHBOUR]
        next_house = monotonic() + self.neighbour_interval
        next_control = 0.0
        while not stop():
            now = monotonic()
            if step(now) < 0:  # no block ready: housekeeping, requests, then sleep in poll
                ring.tx_kick()  # frames an earlier kick could not hand over (EAGAIN) go now
                if now >= next_house:
                    next_house = now + self.neighbour_interval
                    self._housekeeping()
                if control is not None and control.poll():
                    self.serve_control()
                poller.poll(self.poll_ms)
                continue
            if drops[DropReason.NO_NEIGHBOUR] != unresolved_seen:  # a backend's next hop is unknown
                unresolved_seen = drops[DropReason.NO_NEIGHBOUR]
                next_house = min(next_house, now + NEIGHBOUR_SOON)
            if now >= next_house:
                next_house = now + self.neighbour_interval
                self._housekeeping()
            if control is not None and now >= next_control:
                next_control = now + CONTROL_EVERY
                if control.poll():
                    self.serve_control()
        ring.tx_kick()
        self._housekeeping()

    def serve_control(self) -> None:
        """Answer the supervisor: ("apply", changed, removed) -> pools built, ("counters", walk) -> Counters,
        ("explain", FlowKey) -> Explanation. An error is reported, and the worker keeps forwarding."""
        control = self.control
        assert control is not None
        while control.poll():
            request = control.recv()
            try:
                if request[0] == "apply":
                    reply: Any = self.local.apply_changes(request[1], request[2])
                elif request[0] == "counters":
                    reply = self.counters(ready=True, walk=request[1])
                elif request[0] == "explain":
                    reply = self.local.explain(request[1])
                else:
                    raise ValueError(f"unknown request {request[0]!r}")
            except Exception as exc:
                control.send(("error", f"{type(exc).__name__}: {exc}"))
            else:
                control.send(("ok", reply))

    def close(self) -> None:
        self.resolver.close()
        if self.spill is not None:
            self.spill.close()
        if self.ring is not None:
            self.ring.close()
