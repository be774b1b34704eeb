"""The Dataplane protocol (rusty_rail.control.model) over the XDP engine.

Tables are built in Python, on the engine's Balancer, then copied into the maps (`XdpEngine.sync`). The
control plane may apply a state before the engine has started; it is kept and applied to the balancer
as soon as the engine builds it, before the program is attached.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any, cast

from rusty_rail.control.balancer_dataplane import FLOW_COUNT_LIMIT, BalancerDataplane
from rusty_rail.control.model import DataplaneState
from rusty_rail.core.balancer import Balancer
from rusty_rail.core.flow import FlowKey
from rusty_rail.engines.xdp_engine import XdpEngine


class XdpDataplane:
    def __init__(self, device: str, factory: Callable[[], Balancer], **engine_options: Any) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._state: DataplaneState | None = None
        self._inner: BalancerDataplane | None = None
        self.engine = XdpEngine(device, self._build, **engine_options)

    def _build(self) -> Balancer:
        balancer = self._factory()
        with self._lock:
            self._inner = BalancerDataplane(balancer)
            if self._state is not None:
                self._inner.apply(self._state)
        return balancer

    def serve(self, stop: threading.Event) -> dict[str, int]:
        return self.engine.serve_forever(stop)

    def apply(self, state: DataplaneState) -> None:
        with self._lock:
            self._state = state
            if self._inner is None:
                return
            self._inner.apply(state)
        self.engine.sync()

    def counters(self) -> dict[str, object]:
        """The kernel's figures, summed over CPUs, in BalancerDataplane's shape:

        - the rr_stats counters (forwarded, passed, drop_<reason>, conn_hit, conn_new, conn_insert);
        - 'backends': {(service or None, backend): (packets, inner bytes)} from rr_backend_stats, for
          every backend the balancer lists (a backend listed since the last sync shows (0, 0));
        - 'connections': entries in rr_conns, and 'flows': entries per backend address, from one
          BPF_MAP_LOOKUP_BATCH walk (flows left out above FLOW_COUNT_LIMIT entries, as
          BalancerDataplane does; the walk itself runs in the kernel, off the packet path);
        - 'table_rebuilds' from the Python balancer, which builds the tables.

        - 'connection_evictions': the kernel's LRU map evicts without counting, so it is derived
          (XdpBalancer.connection_evictions): the program's new-entry inserts + entries live at start
          (a handover's table) - entries live now (the same walk) - entries Python removed. Exact
          whenever the table is quiescent; under traffic it can lag by the packets in flight during
          the walk (entries inserted or evicted while it runs may or may not be counted)."""
        out: dict[str, object] = dict(self.engine.counters())
        out["ready"] = self.engine.ready.is_set()
        with self._lock:
            inner = self._inner
        if inner is not None:
            python_side = inner.counters()
            out["table_rebuilds"] = python_side["table_rebuilds"]
            kernel = self.engine.backend_stats()
            listed = cast(dict, python_side["backends"])
            out["backends"] = {key: kernel.get(key, (0, 0)) for key in listed}
        xdp = self.engine.xdp
        if xdp is not None:
            connections, flows = xdp.connection_summary(FLOW_COUNT_LIMIT)
            out["connections"] = connections
            out["connection_evictions"] = xdp.connection_evictions(live=connections)
            if flows is not None:
                out["flows"] = flows
        return out

    def explain(self, key: FlowKey) -> tuple[IPv4Address | None, str]:
        with self._lock:
            inner = self._inner
        if inner is None:
            return None, "the engine has not started"
        xdp = self.engine.xdp
        if xdp is not None:
            entry = xdp.connection(key.packed)
            pool = inner.balancer.pool_for(key.packed)
            if entry is not None and pool is not None and int(entry.backend) in pool.backend_set:
                return entry.backend, "connection entry"
        return inner.explain(key)
