from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from rusty_rail.control import ctl
from rusty_rail.control.plane import ControlPlane
from rusty_rail.control.socket_server import Commands, ControlServer
from tests.control_fakes import B1, B2, B3, WEB, FakeEngine, two_services


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, ControlPlane, FakeEngine]]:
    dp = FakeEngine()
    plane = ControlPlane(two_services(), dp)
    path = str(tmp_path / "run" / "control.sock")
    server = ControlServer(path, Commands(plane, reload=lambda: ["note"]))
    server.start()
    yield path, plane, dp
    server.stop()


def test_socket_is_0600_in_a_created_directory_and_removed_on_stop(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "ctl.sock"
    server = ControlServer(str(path), Commands(ControlPlane(two_services(), FakeEngine())))
    server.start()
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    server.stop()
    assert not path.exists()


def test_a_stale_socket_is_replaced_a_live_one_is_not(tmp_path: Path) -> None:
    path = str(tmp_path / "ctl.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    first = ControlServer(path, Commands(ControlPlane(two_services(), FakeEngine())))
    first.start()
    try:
        with pytest.raises(OSError, match="another rusty-rail is running"):
            ControlServer(path, Commands(ControlPlane(two_services(), FakeEngine()))).start()
    finally:
        first.stop()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(OSError, match="is not a socket"):
        ControlServer(str(regular), Commands(ControlPlane(two_services(), FakeEngine()))).start()
    assert regular.read_text() == "x"


def _raw(path: str, *lines: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        f = s.makefile("rwb")
        answers = []
        for line in lines:
            f.write(line + b"\n")
            f.flush()
            answers.append(json.loads(f.readline()))
        return answers


def test_json_lines_protocol(served: tuple[str, ControlPlane, FakeEngine]) -> None:
    path, plane, dp = served
    answers = _raw(
        path,
        b'{"cmd": "drain", "service": "10.1.0.1:80", "backend": "10.2.0.1"}',
        b'{"cmd": "status"}',
        b"not json",
        b'{"cmd": "launch"}',
        b'{"cmd": "weight", "service": "10.1.0.1:80", "backend": "10.2.0.2", "weight": "x"}',
        b'{"cmd": "add", "service": "10.1.0.1:80"}',
        b'{"cmd": "reload"}',
    )
    assert answers[0] == {"ok": True, "result": None}
    assert dp.last[WEB] == {B1: 0, B2: 2}
    assert answers[1]["ok"] and answers[1]["result"]["services"][0]["backends"][0]["drained"] is True
    assert answers[2] == {"ok": False, "error": "request is not JSON"}
    assert answers[3] == {"ok": False, "error": "unknown command 'launch'"}
    assert answers[4] == {"ok": False, "error": "weight 'x' is not a whole number"}
    assert answers[5] == {"ok": False, "error": '"backend" is missing'}
    assert answers[6] == {"ok": True, "result": {"notes": ["note"]}}


def test_ctl_commands(served: tuple[str, ControlPlane, FakeEngine], capsys: pytest.CaptureFixture[str]) -> None:
    path, plane, dp = served
    assert ctl.main(["--socket", path, "add", "10.1.0.1:80", "10.2.0.3", "--weight", "3"]) == 0
    assert ctl.main(["--socket", path, "weight", "10.1.0.1:80", "10.2.0.1", "4"]) == 0
    assert ctl.main(["--socket", path, "drain", "10.1.0.1:80", "10.2.0.2"]) == 0
    assert dp.last[WEB] == {B1: 4, B2: 0, B3: 3}
    assert ctl.main(["--socket", path, "undrain", "10.1.0.1:80", "10.2.0.2"]) == 0
    assert ctl.main(["--socket", path, "remove", "10.1.0.1:80", "10.2.0.3"]) == 0
    assert dp.last[WEB] == {B1: 4, B2: 2}
    capsys.readouterr()

    assert ctl.main(["--socket", path, "status"]) == 0
    out = capsys.readouterr().out
    assert "TCP  10.1.0.1:80" in out and "UDP  10.1.0.1:53" in out and "tcp:8080" in out
    assert "  -> 10.2.0.1" in out and "drops no_service 2" in out

    assert ctl.main(["--socket", path, "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["services"][0]["backends"][0]["weight"] == 4

    assert ctl.main(["--socket", path, "explain", "192.0.2.7:40000", "10.1.0.1:80"]) == 0
    assert capsys.readouterr().out.strip() == \
        "192.0.2.7:40000 -> 10.1.0.1:80 tcp: service 10.1.0.1:80/tcp, backend 10.2.0.1 (table slot 42)"
    assert ctl.main(["--socket", path, "explain", "192.0.2.7:40000", "10.1.0.1:53", "udp"]) == 0
    assert dp.explained[-1].protocol == 17
    assert ctl.main(["--socket", path, "explain", "[2001:db8:c::7]:40000", "[2001:db8:1::1]:443"]) == 0
    assert "\n[2001:db8:c::7]:40000 -> [2001:db8:1::1]:443 tcp: service None" in capsys.readouterr().out
    assert str(dp.explained[-1].dst) == "2001:db8:1::1" and dp.explained[-1].dport == 443
    assert ctl.main(["--socket", path, "add", "10.1.0.1:80", "2001:db8:2::9"]) == 0
    assert ctl.main(["--socket", path, "status"]) == 0
    out = capsys.readouterr().out
    assert "  -> 2001:db8:2::9" in out and "ipv6: forwarded 4 connections 2" in out


def test_ctl_errors_are_one_line_and_exit_1(served: tuple[str, ControlPlane, FakeEngine], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = served
    assert ctl.main(["--socket", path, "drain", "10.1.0.1:80", "10.2.0.9"]) == 1
    assert capsys.readouterr().err == "rusty-rail ctl: 10.2.0.9 is not a backend of 10.1.0.1:80/tcp\n"
    assert ctl.main(["--socket", path, "drain", "10.1.0.1:http", "10.2.0.1"]) == 1
    assert "is not a service" in capsys.readouterr().err
    assert ctl.main(["--socket", path, "explain", "192.0.2.7", "10.1.0.1:80"]) == 1
    assert capsys.readouterr().err == "rusty-rail ctl: client '192.0.2.7' is not IP:PORT or [IPv6]:PORT\n"
    assert ctl.main(["--socket", path, "explain", "[2001:db8::7]:1", "10.1.0.1:80"]) == 1
    assert "not of one family" in capsys.readouterr().err
    assert ctl.main(["--socket", path, "add", "10.1.0.1:80", "2001:db8::zz"]) == 1
    assert capsys.readouterr().err == "rusty-rail ctl: '2001:db8::zz' is not an IPv4 or IPv6 address\n"
    missing = str(tmp_path / "nothing.sock")
    assert ctl.main(["--socket", missing, "status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"rusty-rail ctl: cannot reach the daemon at {missing}: No such file or directory")
    assert err.count("\n") == 1


def test_explain_command(served: tuple[str, ControlPlane, FakeEngine], capsys: pytest.CaptureFixture[str]) -> None:
    path, _, dp = served
    assert ctl.explain_main(["--socket", path, "192.0.2.7:40000", "10.1.0.1:53", "udp"]) == 0
    assert "backend 10.2.0.1 (table slot 42)" in capsys.readouterr().out
    assert dp.explained[-1].dport == 53 and dp.explained[-1].protocol == 17
