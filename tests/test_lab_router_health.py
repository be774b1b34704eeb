"""The lab router's balancer checker (router_health.py) without namespaces: fall/rise, target order,
what it writes to the router's map and the events it prints."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from rusty_rail.lab.router_health import Checker

LB1, LB2, LB3 = "192.168.137.11", "192.168.137.12", "192.168.137.13"


class FakeMaps:
    def __init__(self, targets: list[str]) -> None:
        self.targets = list(targets)
        self.writes: list[list[str]] = []

    def config(self) -> tuple[str, str, list[str]]:
        return "10.1.0.0/24", "192.168.137.1", list(self.targets)

    def configure(self, service_net: str, src: str, targets: list[str]) -> None:
        assert (service_net, src) == ("10.1.0.0/24", "192.168.137.1")  # kept as found
        self.targets = list(targets)
        self.writes.append(list(targets))


def events(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_fall_rise_and_order(capsys: pytest.CaptureFixture[str]) -> None:
    maps = FakeMaps([LB1, LB2, LB3])
    c = Checker(maps, [LB1, LB2, LB3], 9100, interval=0.1, timeout=0.1, fall=2, rise=3)  # type: ignore[arg-type]
    for lb in (LB1, LB2, LB3):
        c._result(lb, None)
    (ready,) = events(capsys)
    assert ready["event"] == "ready" and ready["up"] == [LB1, LB2, LB3]

    c._result(LB1, "refused")
    assert maps.writes == []  # one failure is not enough
    c._result(LB1, None)  # a success resets the count
    c._result(LB1, "refused")
    assert maps.writes == []
    c._result(LB1, "refused")
    assert maps.writes == [[LB2, LB3]]
    (down,) = events(capsys)
    assert (down["event"], down["balancer"], down["reason"], down["targets"]) == ("down", LB1, "refused", [LB2, LB3])
    assert down["t_detected"] <= down["t_map"]

    c._result(LB1, "refused")  # still down: nothing more written
    for _ in range(2):
        c._result(LB1, None)
    assert maps.writes == [[LB2, LB3]]
    c._result(LB1, None)  # the third success in a row
    assert maps.writes[-1] == [LB1, LB2, LB3]  # back in its original place
    (up,) = events(capsys)
    assert (up["event"], up["balancer"], up["reason"]) == ("up", LB1, None)

    for lb in (LB1, LB2, LB3):  # all gone: the router has no target (and counts no_target)
        c._result(lb, "x")
        c._result(lb, "x")
    assert maps.writes[-1] == []


def test_probes_a_listening_process() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        c = Checker(FakeMaps([]), ["127.0.0.1"], port, interval=0.1, timeout=0.5, fall=2, rise=2,  # type: ignore[arg-type]
                    probe="tcp")
        assert c.probe("127.0.0.1") is None
    failure = c.probe("127.0.0.1")  # the listener is gone, as with a dead balancer process
    assert failure is not None and "refused" in failure.lower()


def test_http_probe_waits_for_the_engine() -> None:
    """A daemon answers on metrics before its engine forwards; the router must not send to it yet."""
    import http.server
    import threading

    body = {"text": b"rusty_rail_ready 0.0\n"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"# HELP x\n" + body["text"])

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        c = Checker(FakeMaps([]), ["127.0.0.1"], server.server_port, interval=0.1, timeout=0.5, fall=2, rise=2)  # type: ignore[arg-type]
        assert c.probe("127.0.0.1") == "not ready"
        body["text"] = b"rusty_rail_ready 1.0\n"
        assert c.probe("127.0.0.1") is None
    finally:
        server.shutdown()
        server.server_close()
