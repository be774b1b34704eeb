"""One worker's Balancer as the engine drives it: services in, counters and explanations out.

With one worker the engine calls this from the control plane's threads while the packet loop runs
decide() in another; with several, each forked worker calls it on the supervisor's requests. Either way
`Balancer.set_services` builds the new pools completely and swaps them in with plain attribute
assignments (atomic under the GIL), so decide() sees the old services or the new ones, never half.
A service whose table did not change keeps its pool, its resolved slots and its figures: a drain in one
service costs no other service anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from rusty_rail.core.address import Address, as_address
from rusty_rail.core.balancer import Balancer
from rusty_rail.core.constants import FLOW_COUNT_LIMIT
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import Service, ServiceKey, ServiceMatcher
from rusty_rail.core.verdict import DropReason
from rusty_rail.dataplane import Counters, Explanation

_DROP_NAMES = tuple((reason, reason.name.lower()) for reason in DropReason)


class LocalBalancer:
    """The engine's handle on one in-process Balancer."""

    def __init__(self, balancer: Balancer, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` must be the packet loop's (the `now` it passes to decide())."""
        self.balancer = balancer
        self.clock = clock
        self._services: dict[ServiceKey, Service] = {key: pool.service for key, pool in balancer.services.items()}
        self.pools_built = len(self._services)
        """Pools (a table resolved to addresses) built so far: once per service and per change of it."""

    @property
    def services(self) -> dict[ServiceKey, Service]:
        return dict(self._services)

    def apply(self, services: Iterable[Service]) -> int:
        """Serve exactly `services`; returns the pools built (services new or changed)."""
        return self._serve({s.key: s for s in services})

    def apply_changes(self, changed: Iterable[Service], removed: Iterable[ServiceKey]) -> int:
        """Serve what is served now with `changed` services replaced or added and `removed` ones gone:
        what a forked worker receives, so that a change of one service does not ship every table."""
        wanted = dict(self._services)
        for key in removed:
            wanted.pop(key, None)
        for service in changed:
            wanted[service.key] = service
        return self._serve(wanted)

    def _serve(self, wanted: dict[ServiceKey, Service]) -> int:
        if wanted == self._services:  # the same Service objects: compared by identity first, cheap
            return 0
        before = self.balancer.services
        self.balancer.set_services(wanted[key] for key in sorted(wanted))
        built = sum(1 for key, pool in self.balancer.services.items() if before.get(key) is not pool)
        self._services = wanted
        self.pools_built += built
        return built

    def counters(self, engine: Mapping[str, int] | None = None, ready: bool = False, walk: bool = True) -> Counters:
        """The balancer's figures, with the engine's own (`engine`) alongside; walk=False: no flows."""
        b = self.balancer
        drops = b.drops
        forwarded = b.forwarded - drops[DropReason.TX_FAILED]  # decided, but neither TX path took it
        return Counters(
            forwarded=forwarded,
            forwarded_ipv6=min(b.forwarded6, forwarded),  # a failed send is not traced to its family
            connections_ipv6=b.connections.ipv6,
            passed=b.passed,
            drops={name: drops[reason] for reason, name in _DROP_NAMES},
            connections=len(b.connections),
            connection_evictions=b.connections.evictions,
            backends=b.backend_figures(),
            flows=self.flows() if walk else None,
            ready=ready,
            engine=dict(engine or {}),
            options={"icmp_echo_replies": b.echo_replies, "icmp_too_big": b.too_big_replies,
                     "quic_routed": b.quic_routed},
        )

    def flows(self) -> dict[tuple[ServiceKey, Address], int] | None:
        """Connection entries per (service, backend), the service being the one the entry's key matches
        now; None above FLOW_COUNT_LIMIT entries (or while the packet loop keeps changing the table
        under the walk)."""
        table = self.balancer.connections
        if len(table) > FLOW_COUNT_LIMIT:
            return None
        matcher = ServiceMatcher({key: key for key in self._services})
        for _ in range(3):  # the packet loop may change the table while we walk it; try again
            try:
                entries = table.items()
            except RuntimeError:
                continue
            return {(service, as_address(b)): n for (service, b), n in matcher.tally(entries).items()}
        return None

    def explain(self, key: FlowKey) -> Explanation:
        backend, reason = self.balancer.explain(key, self.clock())
        return Explanation(backend, reason)


def merge_counters(parts: list[Counters], ready: bool) -> Counters:
    """Workers' counters added up (each worker has its own connection table and figures)."""
    drops: dict[str, int] = {}
    backends: dict[tuple[ServiceKey, Address], tuple[int, int]] = {}
    flows: dict[tuple[ServiceKey, Address], int] | None = {}
    engine: dict[str, int] = {}
    options: dict[str, int] = {}
    for part in parts:
        for name, n in part.drops.items():
            drops[name] = drops.get(name, 0) + n
        for key, (packets, nbytes) in part.backends.items():
            p0, b0 = backends.get(key, (0, 0))
            backends[key] = (p0 + packets, b0 + nbytes)
        if part.flows is None or flows is None:
            flows = None  # one worker's table is too large to walk: no total is honest
        else:
            for key, n in part.flows.items():
                flows[key] = flows.get(key, 0) + n
        for name, n in part.engine.items():
            engine[name] = engine.get(name, 0) + n
        for name, n in part.options.items():
            options[name] = options.get(name, 0) + n
    return Counters(
        forwarded=sum(p.forwarded for p in parts),
        forwarded_ipv6=sum(p.forwarded_ipv6 for p in parts),
        connections_ipv6=sum(p.connections_ipv6 for p in parts),
        passed=sum(p.passed for p in parts),
        drops=drops,
        connections=sum(p.connections for p in parts),
        connection_evictions=sum(p.connection_evictions for p in parts),
        backends=backends,
        flows=flows,
        ready=ready,
        engine=engine,
        options=options,
    )
