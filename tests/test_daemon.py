"""The daemon around a fake engine: socket, metrics, SIGHUP reload (good and bad files), SIGTERM, health."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from rusty_rail.control.config import load_config, loads_config
from rusty_rail.control.ctl import ControlClient, CtlError
from rusty_rail.control.runtime import ControlRuntime
from rusty_rail.daemon import run
from rusty_rail.dataplane import EngineReport
from tests.control_fakes import FakeEngine

WEB = "10.1.0.1:80/tcp"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_text(sock: Path, metrics_port: int, backends: str) -> str:
    return (
        f'device = "eth0"\ncontrol_socket = "{sock}"\nmetrics = "127.0.0.1:{metrics_port}"\n'
        f'[[services]]\nvip = "10.1.0.1"\nport = 80\nbackends = {backends}\n'
    )


def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)  # polling a condition with a deadline, not waiting a fixed time


class ScriptedEngine(FakeEngine):
    """A fake engine whose serve() runs a script (what an operator does while the daemon runs)."""

    def __init__(self, script: Callable[[threading.Event], None]) -> None:
        super().__init__()
        self.script = script
        self.started = False

    def start(self) -> None:
        self.started = True

    def serve(self, stop: threading.Event) -> EngineReport:
        self.script(stop)
        return EngineReport(self.kind, bool(self.pinned), self.canned)


def test_the_daemon_end_to_end(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "ctl.sock"
    port = _free_port()
    path = tmp_path / "config.toml"
    path.write_text(_config_text(sock, port, '["10.2.0.1", "10.2.0.2"]'))
    config = load_config(path)
    seen: dict[str, object] = {}

    def script(stop: threading.Event) -> None:
        with ControlClient(str(sock)) as client:
            status = client.request({"cmd": "status"})
            seen["backends"] = [b["address"] for b in status["services"][0]["backends"]]
            client.request({"cmd": "drain", "service": "10.1.0.1:80", "backend": "10.2.0.2"})
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                seen["metrics"] = r.read().decode()

            # A good file on SIGHUP: applied, the drain of a backend that stays is kept.
            path.write_text(_config_text(sock, port, '["10.2.0.1", "10.2.0.2", "10.2.0.3"]'))
            os.kill(os.getpid(), signal.SIGHUP)
            _until(lambda: len(client.request({"cmd": "status"})["services"][0]["backends"]) == 3)
            seen["after_reload"] = dp.last

            # A bad file: rejected, logged, the running configuration stays.
            path.write_text(_config_text(sock, port, '["10.2.0.1", { address = "10.2.0.2", weight = -1 }]'))
            os.kill(os.getpid(), signal.SIGHUP)
            _until(lambda: client.request({"cmd": "status"})["control"]["reload_failures"] == 1)
            seen["after_bad"] = client.request({"cmd": "status"})
            with pytest.raises(CtlError, match=r"services\[0\].backends\[1\].weight: -1 is not >= 0"):
                client.request({"cmd": "reload"})
        os.kill(os.getpid(), signal.SIGTERM)
        _until(stop.is_set)

    dp = ScriptedEngine(script)
    before = signal.getsignal(signal.SIGHUP)
    assert run(config, str(path), engine=dp) == 0
    assert dp.started and signal.getsignal(signal.SIGHUP) is before
    assert not sock.exists()

    assert seen["backends"] == ["10.2.0.1", "10.2.0.2"]
    assert 'rusty_rail_backend_packets_total{backend="10.2.0.1",service="10.1.0.1:80/tcp"}' in str(seen["metrics"])
    key = loads_config(_config_text(sock, port, "[]")).services[0].key
    a, b, c = (IPv4Address(f"10.2.0.{i}") for i in (1, 2, 3))
    assert seen["after_reload"] == {key: {a: 1, b: 0, c: 1}}
    bad = seen["after_bad"]
    assert [x["address"] for x in bad["services"][0]["backends"]] == ["10.2.0.1", "10.2.0.2", "10.2.0.3"]  # type: ignore[index]
    assert "weight: -1 is not >= 0" in bad["control"]["last_reload_error"]  # type: ignore[index]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_health_checks_take_a_dead_backend_out(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    alive = listener.getsockname()[1]
    # 127.0.0.2 is loopback too on Linux; nothing listens there on that port, so its check is refused.
    text = (
        f'device = "lo"\ncontrol_socket = "{tmp_path / "ctl.sock"}"\n'
        f'[[services]]\nvip = "10.1.0.1"\nport = {alive}\nbackends = ["127.0.0.1", "127.0.0.2"]\n'
        '[services.health]\ntype = "tcp"\ninterval = 0.05\ntimeout = 0.05\nrise = 1\nfall = 2\n'
    )
    dp = FakeEngine()
    daemon = ControlRuntime(loads_config(text), dp)
    daemon.start()
    try:
        _until(lambda: dp.last and list(dp.last.values())[0] == {IPv4Address("127.0.0.1"): 1})
        backends = daemon.plane.status()["services"][0]["backends"]
        assert [(b["address"], b["health"]) for b in backends] == [("127.0.0.1", "up"), ("127.0.0.2", "down")]
        assert "refused" in backends[1]["health_reason"].lower()
    finally:
        daemon.stop()
        listener.close()


def test_sigusr2_hands_over_only_when_it_can_pin(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGUSR2 with an engine that cannot pin: logged, and the daemon serves on (a later SIGTERM is a
    plain stop, exit 0); with one that can: exit 75 (HANDOVER_EXIT) once the pins are made."""
    config = loads_config(f'device = "eth0"\npin_root = "{tmp_path}"\ncontrol_socket = "{tmp_path / "ctl.sock"}"\n'
                          '[[services]]\nvip = "10.1.0.1"\nport = 80\nbackends = ["10.2.0.1"]\n')

    def refused(stop: threading.Event) -> None:
        os.kill(os.getpid(), signal.SIGUSR2)
        _until(lambda: "cannot hand over" in caplog.text)
        assert not stop.is_set() and dp.pinned == []
        os.kill(os.getpid(), signal.SIGTERM)
        _until(stop.is_set)

    dp = ScriptedEngine(refused)
    dp.handover_error = "the pin root cannot be used: mounting bpffs failed"
    assert run(config, engine=dp) == 0
    assert f"RR_PIN_ROOT {tmp_path}" in caplog.text

    def accepted(stop: threading.Event) -> None:
        os.kill(os.getpid(), signal.SIGUSR2)
        _until(stop.is_set)

    dp = ScriptedEngine(accepted)
    assert run(config, engine=dp) == 75 and dp.pinned == [str(tmp_path)]
