"""control/handover.py: the handover exchange over a real control socket (with a fake engine), the
health records it carries, and a runtime that starts from them."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import threading
from ipaddress import ip_address
from pathlib import Path

import pytest

from rusty_rail.control.config import HealthSpec, HealthType
from rusty_rail.control.handover import (DaemonHandover, HandoverAnswer, HandoverRefused, HandoverRequest,
                                         HealthRecord, ask, carried_for)
from rusty_rail.control.health import HealthChecker
from rusty_rail.control.runtime import ControlRuntime
from rusty_rail.control.socket_server import Commands
from tests.control_fakes import B1, B2, B3, DNS, WEB, FakeEngine, two_services
from tests.engine_netns import wait_for
from tests.test_control_health import Inline, Script

CHECK = two_services().services[0].health  # WEB's: tcp 8080, rise 2, fall 2
DOWN = HealthRecord(WEB, B2, CHECK, up=False, reason="2 checks failed, last: refused", successes=0, failures=2)
UP = HealthRecord(WEB, B1, CHECK, up=True, reason="", successes=5, failures=0)


def test_health_records_and_answers_round_trip_and_bad_input_is_named() -> None:
    six = HealthRecord(WEB, ip_address("2001:db8:2::1"), CHECK, up=False, reason="refused", successes=0, failures=2)
    answer = HandoverAnswer(True, "", (DOWN, UP, six))
    assert HandoverAnswer.from_json(answer.to_json()) == answer  # IPv6 backends too
    bad = DOWN.to_json() | {"failures": "2"}
    with pytest.raises(ValueError, match='"failures"'):
        HealthRecord.from_json(bad)
    with pytest.raises(ValueError, match='"up"'):
        HealthRecord.from_json(DOWN.to_json() | {"up": 1})
    with pytest.raises(ValueError):
        HandoverAnswer.from_json({"handed_over": True, "why": "", "health": [{"service": "nonsense"}]})
    request = HandoverRequest("/sys/fs/bpf/rusty_rail", (41, 1))
    assert HandoverRequest.from_json(request.to_json()) == request
    for broken in ({"pin_root": "relative", "pin_root_id": [1, 2]}, {"pin_root": "/x", "pin_root_id": [1]},
                   {"pin_root": "/x"}, {"pin_root": "/x", "pin_root_id": [True, 2]}):
        with pytest.raises(ValueError):
            HandoverRequest.from_json(broken)


def test_only_records_that_still_apply_are_carried() -> None:
    other_check = dataclasses.replace(DOWN, check=HealthSpec(HealthType.HTTP, 8080))
    gone = dataclasses.replace(DOWN, backend=B3)
    unchecked = dataclasses.replace(DOWN, service=DNS, backend=B1, check=HealthSpec())
    assert carried_for([DOWN, UP, other_check, gone, unchecked], two_services()) == {(WEB, B2): DOWN, (WEB, B1): UP}


def test_a_runtime_starts_from_carried_health() -> None:
    """The down backend is left out of the very first state the engine gets, and each check goes on
    counting from where the predecessor's was."""
    engine = FakeEngine()
    script = Script({B1: [None], B2: ["refused"]})
    changes: list[tuple] = []
    checker = HealthChecker(on_change=lambda *a: changes.append(a), clock=lambda: 0.0, probe=script,
                            executor=Inline())
    config = dataclasses.replace(two_services(), control_socket=None)  # no socket: nothing on the host's /run
    runtime = ControlRuntime(config, engine, checker=checker, carried_health=[DOWN, UP])
    assert engine.applied[0].services[0].table.backends == (B1,)  # never served B2
    assert runtime.plane.status()["control"]["health_carried"] == 2
    runtime.start()
    try:
        wait_for(lambda: len(script.calls) == 2, 5, what="one probe of each backend")
        wait_for(lambda: checker.state(WEB, B2).checks == 1, 5)  # type: ignore[union-attr]
        records = {(r.service, r.backend): r for r in runtime.health_records()}
        assert records[(WEB, B2)].failures == 3 and not records[(WEB, B2)].up
        assert records[(WEB, B2)].reason == DOWN.reason
        assert records[(WEB, B1)].successes == 6 and records[(WEB, B1)].up
        assert changes == [] and len(engine.applied) == 1  # no transition: each went on where it was
    finally:
        runtime.stop()


@pytest.fixture
def daemon(tmp_path: Path):
    """A runtime with a control socket around a fake engine; `stopped` is what handing over sets."""
    engine = FakeEngine()
    stopped = threading.Event()
    config = dataclasses.replace(two_services(), control_socket=str(tmp_path / "ctl.sock"))
    checker = HealthChecker(on_change=lambda *a: None, clock=lambda: 0.0, probe=lambda t: None, executor=Inline())
    runtime = ControlRuntime(config, engine, checker=checker, on_handed_over=stopped.set)
    runtime.start()
    pins = tmp_path / "pins"
    pins.mkdir()
    try:
        yield engine, stopped, str(tmp_path / "ctl.sock"), str(pins)
    finally:
        runtime.stop()


def test_handover_over_the_socket(daemon) -> None:
    engine, stopped, sock, pins = daemon
    pid, answer = ask(sock, pins)
    assert pid == os.getpid()  # SO_PEERCRED: the process serving the socket (this one)
    assert answer.handed_over and engine.pinned == [pins]  # one view: the path as given
    assert {(r.service, r.backend) for r in answer.health} == {(WEB, B1), (WEB, B2)}
    wait_for(stopped.is_set, 5, what="the daemon's stop, once the answer was written")
    with pytest.raises(HandoverRefused, match="already under way"):
        ask(sock, pins)


def test_a_handover_the_engine_refuses_changes_nothing(daemon) -> None:
    engine, stopped, sock, pins = daemon
    engine.handover_error = "pinning in /x failed: Operation not permitted"
    with pytest.raises(HandoverRefused, match="Operation not permitted.*serves on"):
        ask(sock, pins)
    assert engine.pinned == [] and not stopped.is_set()
    engine.handover_error = None  # and it can be asked again
    assert ask(sock, pins)[1].handed_over


def test_a_pin_root_the_daemon_cannot_reach_is_refused(daemon, tmp_path: Path) -> None:
    engine, stopped, sock, pins = daemon
    other = tmp_path / "other"
    other.mkdir()
    request = HandoverRequest(pins, HandoverRequest.of(str(other)).pin_root_id)  # names another directory
    answer = Commands(None, handover=DaemonHandover(engine, list, stopped.set, pins)).handle(  # type: ignore[arg-type]
        request.to_json(), peer=os.getpid())
    assert answer["ok"] is False and "cannot reach" in answer["error"] and engine.pinned == []


def test_an_answer_that_went_nowhere_is_undone() -> None:
    engine, stopped = FakeEngine(), threading.Event()
    commands = Commands(None, handover=DaemonHandover(engine, list, stopped.set, "/unused"))  # type: ignore[arg-type]
    request = HandoverRequest.of("/").to_json()
    answer = commands.handle(request, peer=os.getpid())
    assert answer["ok"] and engine.pinned == ["/"]
    commands.settle(request, answer, delivered=False)
    assert engine.pinned == [] and not stopped.is_set()
    again = commands.handle(request, peer=os.getpid())  # not stuck as "under way"
    commands.settle(request, again, delivered=True)
    assert stopped.is_set()
    assert commands.handle({"cmd": "handover"}, peer=os.getpid())["error"].startswith("handover: ")


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare")
def test_an_asker_in_another_network_namespace_is_refused() -> None:
    engine = FakeEngine()
    commands = Commands(None, handover=DaemonHandover(engine, list, lambda: None, "/unused"))  # type: ignore[arg-type]
    other = subprocess.Popen(["unshare", "--net", "sh", "-c", "read x"], stdin=subprocess.PIPE)
    try:
        wait_for(lambda: os.stat(f"/proc/{other.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino, 5)
        answer = commands.handle(HandoverRequest.of("/").to_json(), peer=other.pid)
    finally:
        assert other.stdin is not None
        other.stdin.close()
        other.wait(5)
    assert "another network namespace" in answer["error"] and engine.pinned == []


def test_sigusr2_pins_in_its_own_pin_root_or_serves_on() -> None:
    engine, stops = FakeEngine(), []
    handover = DaemonHandover(engine, list, lambda: stops.append(1), "/sys/fs/bpf/rusty_rail")
    engine.handover_error = "the pin root cannot be used: mounting bpffs failed"
    handover.from_signal()
    assert stops == [] and engine.pinned == []  # refused: serving on
    engine.handover_error = None
    handover.from_signal()
    assert stops == [1] and engine.pinned == ["/sys/fs/bpf/rusty_rail"]
    handover.from_signal()  # once only
    assert stops == [1]


def test_an_engine_with_nothing_to_leave_running_stops_plainly() -> None:
    engine, stops = FakeEngine(), []
    engine.hand_over = lambda pin_root: False  # type: ignore[method-assign]  # AF_PACKET's answer
    answer = DaemonHandover(engine, list, lambda: stops.append(1), "/x").prepare(HandoverRequest.of("/"), os.getpid())
    assert not answer.handed_over and "nothing to leave running" in answer.why
