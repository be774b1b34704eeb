"""The Dataplane protocol over one in-process Balancer (the single-worker AF_PACKET engine, tests).

The control plane calls apply() from its own threads while the engine calls decide() in the packet
loop. Balancer.set_service builds the new pool completely and then swaps it in with plain attribute
and dict assignments, each atomic under the GIL, so decide() sees the old table or the new one, never
half of one. Only services whose backends or weights changed are rebuilt: a drain in one service must
not cost every other service a table build.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address
from typing import cast

from rusty_rail.control.model import DataplaneState
from rusty_rail.core.balancer import Balancer
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.maglev import BackendLike
from rusty_rail.core.service import Pool, ServiceKey

FLOW_COUNT_LIMIT = 200_000
"""Above this many connection entries, status leaves per-backend flow counts out: counting walks the
whole table while holding the GIL, and the packet loop would stall for it."""


class BalancerDataplane:
    def __init__(self, balancer: Balancer, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` must be the engine's clock (the one passed to decide() as `now`)."""
        self.balancer = balancer
        self.clock = clock
        self._applied: dict[ServiceKey, dict[IPv4Address, int]] = {}
        self._open: dict[IPv4Address, int] | None = None

    def apply(self, state: DataplaneState) -> None:
        if state.services is None:
            weights = dict(state.open_backends)
            if weights != self._open:
                self.balancer.set_backends(list(weights), cast(Mapping[BackendLike, int], weights))
                self._open = weights
            return
        wanted = {key: dict(backends) for key, backends in state.services.items()}
        for key in list(self._applied):
            if key not in wanted:
                self.balancer.remove_service(key)
                del self._applied[key]
        for key, weights in wanted.items():
            if self._applied.get(key) != weights:
                self.balancer.set_service(key, list(weights), cast(Mapping[BackendLike, int], weights))
                self._applied[key] = weights

    def counters(self) -> dict[str, object]:
        b = self.balancer
        out: dict[str, object] = dict(b.counters())
        out["table_rebuilds"] = b.table_rebuilds
        backends: dict[tuple[ServiceKey | None, IPv4Address], tuple[int, int]] = {}
        pools: dict[ServiceKey | None, Pool] = {None: b.pool} if b.pool is not None else {k: p for k, p in b.services.items()}
        for key, pool in pools.items():
            for address, packets in dict(pool.packets).items():
                backends[(key, IPv4Address(address))] = (packets, pool.bytes.get(address, 0))
        out["backends"] = backends
        flows = self._flows()
        if flows is not None:
            out["flows"] = flows
        return out

    def _flows(self) -> dict[IPv4Address, int] | None:
        table = self.balancer.connections
        if len(table) > FLOW_COUNT_LIMIT:
            return None
        for _ in range(3):  # the packet loop may change the table while we walk it; try again
            try:
                counts = Counter(backend for _, backend in table.items())
            except RuntimeError:
                continue
            return {IPv4Address(k): v for k, v in counts.items()}
        return None

    def explain(self, key: FlowKey) -> tuple[IPv4Address | None, str]:
        return self.balancer.explain(key, self.clock())
