"""Prometheus metrics, computed at scrape time from ControlPlane.status().

A custom collector (not counters incremented on the packet path): the data plane already counts, in
the balancer or in BPF maps, and a scrape reads those figures once. The registry is our own, so the
process's default metrics and anything else in the global registry stay out of the way (and tests can
run several).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rusty_rail.control.bgp import Announcer
from rusty_rail.control.config_values import parse_metrics_address
from rusty_rail.control.plane import ControlPlane

log = logging.getLogger("rusty_rail.metrics")


class PlaneCollector(Collector):
    def __init__(self, plane: ControlPlane, bgp: Announcer | None = None) -> None:
        self.plane = plane
        self.bgp = bgp

    def collect(self) -> Iterator[Metric]:
        status = self.plane.status()
        labels = ["service", "backend"]
        packets = CounterMetricFamily("rusty_rail_backend_packets", "Packets forwarded to a backend", labels=labels)
        nbytes = CounterMetricFamily("rusty_rail_backend_bytes", "Inner-packet bytes forwarded to a backend", labels=labels)
        up = GaugeMetricFamily("rusty_rail_backend_up", "1 while the backend passes its health check (or has none)", labels=labels)
        weight = GaugeMetricFamily("rusty_rail_backend_weight", "Configured weight", labels=labels)
        drained = GaugeMetricFamily("rusty_rail_backend_drained", "1 while the backend is drained", labels=labels)
        flows = GaugeMetricFamily("rusty_rail_backend_flows", "Connection entries of the service's flows naming the backend",
                                  labels=labels)
        for svc in status["services"]:
            for b in svc["backends"]:
                key = [svc["service"], b["address"]]
                packets.add_metric(key, b["packets"])
                nbytes.add_metric(key, b["bytes"])
                up.add_metric(key, 0.0 if b["health"] == "down" else 1.0)
                weight.add_metric(key, b["weight"])
                drained.add_metric(key, 1.0 if b["drained"] else 0.0)
                if b["flows"] is not None:
                    flows.add_metric(key, b["flows"])
        yield from (packets, nbytes, up, weight, drained, flows)

        c: dict[str, Any] = status["counters"]
        yield GaugeMetricFamily("rusty_rail_ready", "1 once the engine forwards (rings open or program attached)",
                                value=int(status.get("ready", True)))
        yield CounterMetricFamily("rusty_rail_forwarded_packets", "Packets forwarded to a backend", value=c["forwarded"])
        families = c.get("by_family", {})
        by_family = CounterMetricFamily("rusty_rail_family_forwarded_packets",
                                        "Packets forwarded, by the inner packet's family", labels=["family"])
        family_conns = GaugeMetricFamily("rusty_rail_family_connections", "Connection-table entries, by the flow's family",
                                         labels=["family"])
        for family, figures in sorted(families.items()):
            by_family.add_metric([family], figures["forwarded"])
            family_conns.add_metric([family], figures["connections"])
        yield from (by_family, family_conns)
        yield CounterMetricFamily("rusty_rail_passed_packets", "Frames that were not GRE for us, left to the host", value=c["passed"])
        drops = CounterMetricFamily("rusty_rail_drops", "Packets dropped, by reason (docs/WIRE.md section 9)", labels=["reason"])
        for reason, count in sorted(c["drops"].items()):
            drops.add_metric([reason], count)
        yield drops
        yield GaugeMetricFamily("rusty_rail_connections", "Connection-table entries", value=c["connections"])
        yield CounterMetricFamily("rusty_rail_connection_evictions", "Connection entries evicted because the table was full",
                                  value=c["connection_evictions"])
        yield CounterMetricFamily("rusty_rail_table_rebuilds", "Maglev table rebuilds", value=c["table_rebuilds"])
        options = CounterMetricFamily("rusty_rail_option_packets", "Packets the per-service options handled: answers "
                                      "sent (icmp_echo_replies, icmp_too_big), QUIC forwards by server ID (quic_routed)",
                                      labels=["kind"])
        for kind, count in sorted(c.get("options", {}).items()):
            options.add_metric([kind], count)
        yield options
        control = status["control"]
        yield CounterMetricFamily("rusty_rail_config_reloads", "Configuration reloads applied", value=control["reloads"])
        yield CounterMetricFamily("rusty_rail_config_reload_failures", "Configuration reloads rejected", value=control["reload_failures"])
        yield CounterMetricFamily("rusty_rail_health_transitions", "Backend health changes (up or down)", value=control["health_transitions"])
        if self.bgp is not None:
            yield from _bgp_metrics(self.bgp.status())


def _bgp_metrics(status: dict[str, Any]) -> Iterator[Metric]:
    up = GaugeMetricFamily("rusty_rail_bgp_session_up", "1 while the BGP session with the peer is established",
                           labels=["peer"])
    announced = GaugeMetricFamily("rusty_rail_bgp_announced", "Prefixes announced to the peer (0 without a session)",
                                  labels=["peer"])
    uptime = GaugeMetricFamily("rusty_rail_bgp_session_uptime_seconds", "Seconds the session has been established",
                               labels=["peer"])
    for peer in status["peers"]:
        up.add_metric([peer["address"]], 1.0 if peer["state"] == "up" else 0.0)
        announced.add_metric([peer["address"]], len(peer["prefixes"]))
        uptime.add_metric([peer["address"]], peer["uptime_s"] or 0.0)
    yield from (up, announced, uptime)
    yield GaugeMetricFamily("rusty_rail_bgp_drained", "1 while the balancer is drained (every VIP withdrawn)",
                            value=1.0 if status["drained"] else 0.0)


class MetricsServer:
    """The Prometheus endpoint on host:port (port 0: any free one), in a background thread."""

    def __init__(self, plane: ControlPlane, host: str, port: int, bgp: Announcer | None = None) -> None:
        self.host, self.port = host, port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PlaneCollector(plane, bgp))
        self._server: Any = None
        self._thread: Any = None

    @classmethod
    def from_address(cls, address: str, plane: ControlPlane, bgp: Announcer | None = None) -> MetricsServer:
        host, port = parse_metrics_address(address)
        return cls(plane, host, port, bgp)

    def start(self) -> None:
        self._server, self._thread = start_http_server(self.port, self.host, registry=self.registry)
        self.port = self._server.server_port  # when 0 was asked for (tests)
        log.info("metrics at http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None
