from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from ipaddress import IPv4Address

import pytest

from rusty_rail.control.health import HealthChecker, HealthState, Target, probe
from rusty_rail.control.config import HealthSpec, HealthType
from rusty_rail.core.service import ServiceKey

WEB = ServiceKey.parse("10.1.0.1:80")
B1, B2 = IPv4Address("10.2.0.1"), IPv4Address("10.2.0.2")
TCP = HealthSpec(HealthType.TCP, 8080, interval=1.0, timeout=0.5, rise=2, fall=3)


def test_state_falls_after_fall_failures_and_rises_after_rise_passes() -> None:
    state = HealthState(rise=2, fall=3)
    assert state.up
    assert [state.record(False, "refused") for _ in range(3)] == [False, False, True]
    assert not state.up and state.last_error == "refused"
    assert state.record(True) is False and not state.up
    assert state.record(True) is True and state.up


def test_a_success_resets_the_failure_run() -> None:
    state = HealthState(rise=1, fall=2)
    for ok in (False, True, False, True, False):
        assert state.record(ok) is False
    assert state.up


class Inline:
    """An executor that runs the probe at once, so the schedule is deterministic."""

    def submit(self, fn, *args):  # type: ignore[no-untyped-def]
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class Script:
    """Probe results per backend, in order; records when each probe ran."""

    def __init__(self, results: dict[IPv4Address, list[str | None]]) -> None:
        self.results = results
        self.calls: list[IPv4Address] = []

    def __call__(self, target: Target) -> str | None:
        self.calls.append(target.backend)
        return self.results[target.backend].pop(0)


def _checker(script: Script, now: list[float]) -> tuple[HealthChecker, list[tuple]]:
    changes: list[tuple] = []
    checker = HealthChecker(on_change=lambda *a: changes.append(a), clock=lambda: now[0], probe=script, executor=Inline())
    return checker, changes


def test_schedule_and_transitions_with_a_fake_clock() -> None:
    now = [100.0]
    script = Script({B1: [None] * 10, B2: ["refused"] * 3 + [None] * 2})
    checker, changes = _checker(script, now)
    checker.set_targets([Target(WEB, B1, TCP), Target(WEB, B2, TCP)])
    assert checker.tick(100.0) == 101.0  # both probed at once, next due one interval later
    assert script.calls == [B1, B2]
    assert checker.tick(100.5) == 101.0 and len(script.calls) == 2  # nothing due yet
    checker.tick(101.0)
    assert changes == []
    checker.tick(102.0)  # third failure of B2
    assert changes == [(WEB, B2, False, "3 checks failed, last: refused")]
    checker.tick(103.0)
    checker.tick(104.0)
    assert changes[-1] == (WEB, B2, True, "2 checks passed")
    assert checker.state(WEB, B1).up and checker.state(WEB, B1).checks == 5  # type: ignore[union-attr]


def test_targets_that_stay_keep_their_state_and_none_is_not_checked() -> None:
    now = [0.0]
    script = Script({B1: ["refused"] * 5})
    checker, _ = _checker(script, now)
    checker.set_targets([Target(WEB, B1, TCP)])
    checker.tick(0.0)
    checker.set_targets([Target(WEB, B1, TCP), Target(WEB, B2, HealthSpec())])
    assert checker.state(WEB, B1).failures == 1  # type: ignore[union-attr]
    assert checker.state(WEB, B2) is None
    changed = HealthSpec(HealthType.TCP, 8081)
    checker.set_targets([Target(WEB, B1, changed)])
    assert checker.state(WEB, B1).failures == 0  # type: ignore[union-attr]


def test_a_result_for_a_removed_target_is_ignored() -> None:
    checker = HealthChecker(on_change=lambda *a: pytest.fail("no change expected"), clock=lambda: 0.0)
    target = Target(WEB, B1, HealthSpec(HealthType.TCP, 8080, fall=1))
    checker.set_targets([target])
    checker.set_targets([])
    checker.report(target, 1, "refused")


def test_the_background_thread_reports_a_transition() -> None:
    now = [0.0]
    down = threading.Event()
    checker = HealthChecker(on_change=lambda s, b, up, r: down.set() if not up else None, clock=lambda: now[0],
                            probe=lambda t: "refused", executor=Inline())
    checker.set_targets([Target(WEB, B1, HealthSpec(HealthType.TCP, 8080, fall=1))])
    checker.start()
    try:
        assert down.wait(5)
    finally:
        checker.stop()


# -- the real probes, against 127.0.0.1 ---------------------------------------------------------

@pytest.fixture
def listener() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOCAL = ServiceKey.parse("127.0.0.1:80")


def test_tcp_probe(listener: int) -> None:
    assert probe(Target(LOCAL, IPv4Address("127.0.0.1"), HealthSpec(HealthType.TCP, listener))) is None
    error = probe(Target(LOCAL, IPv4Address("127.0.0.1"), HealthSpec(HealthType.TCP, _free_port())))
    assert error and "refused" in error.lower()


@pytest.fixture
def http_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response({"/ok": 200, "/moved": 302}.get(self.path, 503))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_http_probe(http_server: int) -> None:
    def check(path: str) -> str | None:
        return probe(Target(LOCAL, IPv4Address("127.0.0.1"), HealthSpec(HealthType.HTTP, http_server, path=path)))

    assert check("/ok") is None
    assert check("/moved") is None
    assert check("/broken") == "HTTP 503"


def test_tcp_probe_times_out(listener: int) -> None:
    # A listener that never answers HTTP: the GET waits for the timeout.
    error = probe(Target(LOCAL, IPv4Address("127.0.0.1"), HealthSpec(HealthType.HTTP, listener, timeout=0.1)))
    assert error == "no answer within 0.1s"
