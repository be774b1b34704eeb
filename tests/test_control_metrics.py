from __future__ import annotations

import dataclasses
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from rusty_rail.control.metrics import MetricsServer
from rusty_rail.control.plane import ControlPlane
from tests.control_fakes import B2, WEB, FakeEngine, two_services


def _samples(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_scrape_over_http() -> None:
    plane = ControlPlane(two_services(), FakeEngine())
    plane.set_health(WEB, B2, False)
    server = MetricsServer(plane, "127.0.0.1", 0)
    server.start()
    try:
        samples = _samples(server.port)
    finally:
        server.stop()
    web_b1 = (("backend", "10.2.0.1"), ("service", "10.1.0.1:80/tcp"))
    web_b2 = (("backend", "10.2.0.2"), ("service", "10.1.0.1:80/tcp"))
    assert samples[("rusty_rail_backend_packets_total", web_b1)] == 7
    assert samples[("rusty_rail_backend_bytes_total", web_b2)] == 300
    assert samples[("rusty_rail_backend_up", web_b1)] == 1
    assert samples[("rusty_rail_backend_up", web_b2)] == 0
    assert samples[("rusty_rail_backend_weight", web_b2)] == 2
    assert samples[("rusty_rail_drops_total", (("reason", "no_service"),))] == 2
    assert samples[("rusty_rail_connections", ())] == 5
    assert samples[("rusty_rail_connection_evictions_total", ())] == 1
    assert samples[("rusty_rail_table_rebuilds_total", ())] == 3  # WEB, DNS, WEB again without B2
    assert samples[("rusty_rail_health_transitions_total", ())] == 1
    dns_b1 = (("backend", "10.2.0.1"), ("service", "10.1.0.1:53/udp"))
    assert samples[("rusty_rail_backend_flows", web_b1)] == 4  # the same backend, per service
    assert samples[("rusty_rail_backend_flows", dns_b1)] == 2
    assert samples[("rusty_rail_family_forwarded_packets_total", (("family", "ipv6"),))] == 4
    assert samples[("rusty_rail_family_forwarded_packets_total", (("family", "ipv4"),))] == 6
    assert samples[("rusty_rail_family_connections", (("family", "ipv6"),))] == 2
    # our own registry: no process or Python collector metrics from the global one
    assert not any(name.startswith(("process_", "python_")) for name, _ in samples)


def test_from_address() -> None:
    server = MetricsServer.from_address("127.0.0.1:9100", ControlPlane(two_services(), FakeEngine()))
    assert (server.host, server.port) == ("127.0.0.1", 9100)


def test_ready_gauge_follows_the_engine() -> None:
    dataplane = FakeEngine()
    plane = ControlPlane(two_services(), dataplane)
    server = MetricsServer(plane, "127.0.0.1", 0)
    server.start()
    try:
        assert _samples(server.port)[("rusty_rail_ready", ())] == 1
        dataplane.canned = dataclasses.replace(dataplane.canned, ready=False)  # an engine still attaching
        assert _samples(server.port)[("rusty_rail_ready", ())] == 0
        assert plane.status()["ready"] is False
    finally:
        server.stop()
