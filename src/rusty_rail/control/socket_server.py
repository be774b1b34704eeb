"""The control socket: a unix stream socket, mode 0600, speaking JSON lines.

Request, one line:  {"cmd": "drain", "service": "10.1.0.1:80", "backend": "10.2.0.1"}
Answer, one line:   {"ok": true, "result": ...}  or  {"ok": false, "error": "10.2.0.9 is not a backend of ..."}

Commands: status; add (service, backend, [weight]); remove, drain, undrain (service, backend);
weight (service, backend, weight); explain (client "IP:PORT", service "VIP:PORT", [protocol]); reload;
handover (pin_root, pin_root_id: `rusty-rail restart`'s, see handover.py; the asker is known by
SO_PEERCRED, and the daemon stops only once the answer is written); drain-balancer, undrain-balancer
(with [bgp]: withdraw every VIP / announce them again).
A connection may carry many requests (top keeps one open). Only root can connect: the socket is 0600
and created that way before it listens, so no other user ever gets a window to connect.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable
from typing import Any

from rusty_rail.control.bgp import Announcer
from rusty_rail.control.handover import DaemonHandover, HandoverRequest, peer_pid
from rusty_rail.control.plane import ControlError, ControlPlane, parse_backend, parse_service
from rusty_rail.core.address import Address, as_address, split_host_port
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import ServiceProtocol

log = logging.getLogger("rusty_rail.control")

MAX_REQUEST = 64 * 1024


class Commands:
    """Turns a request into a call on the control plane. Separate from the server so tests call it directly."""

    def __init__(self, plane: ControlPlane, reload: Callable[[], list[str]] | None = None,
                 handover: DaemonHandover | None = None, bgp: Announcer | None = None) -> None:
        self.plane = plane
        self.reload = reload
        """Reloads the configuration file (the daemon's SIGHUP action); None for the environment form."""
        self.handover = handover
        """The daemon's side of a hitless restart; None: this process cannot hand over."""
        self.bgp = bgp
        """The BGP announcer ([bgp]), or None."""

    def handle(self, request: Any, peer: int | None = None) -> dict[str, Any]:
        """The answer to one request; `peer` is the asking process's pid (SO_PEERCRED)."""
        try:
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ControlError('a request is a JSON object with "cmd"')
            if request["cmd"] == "handover":
                return {"ok": True, "result": self._handover(request, peer)}
            return {"ok": True, "result": self._dispatch(request)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not kill the daemon's control socket
            log.exception("control request %r failed", request)
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}

    def settle(self, request: Any, answer: dict[str, Any], delivered: bool) -> None:
        """After an answer was written (`delivered`) or could not be: a handover completes (the daemon
        stops) only once its asker has the answer, and is undone otherwise."""
        if (self.handover is not None and answer.get("ok") and isinstance(request, dict)
                and request.get("cmd") == "handover"):
            self.handover.settle(delivered)

    def _handover(self, request: dict[str, Any], peer: int | None) -> Any:
        if self.handover is None:
            raise ControlError("this daemon cannot hand over")
        try:
            parsed = HandoverRequest.from_json(request)
        except ValueError as exc:
            raise ControlError(f"handover: {exc}") from None
        return self.handover.prepare(parsed, peer).to_json()

    def _dispatch(self, request: dict[str, Any]) -> Any:
        cmd = request["cmd"]
        plane = self.plane
        if cmd == "status":
            return {**plane.status(), "bgp": None if self.bgp is None else self.bgp.status()}
        if cmd in ("drain-balancer", "undrain-balancer"):
            if self.bgp is None:
                raise ControlError("no [bgp] in the configuration: this balancer announces nothing to withdraw")
            self.bgp.set_drained(cmd == "drain-balancer")
            return self.bgp.status()
        if cmd == "explain":
            return plane.explain(_flow(request))
        if cmd == "reload":
            if self.reload is None:
                raise ControlError("no configuration file to reload (started from the environment)")
            return {"notes": self.reload()}
        if cmd in ("add", "remove", "drain", "undrain", "weight"):
            service = parse_service(_field(request, "service"))
            backend = parse_backend(_field(request, "backend"))
            if cmd == "add":
                plane.add(service, backend, _weight(request.get("weight", 1)))
            elif cmd == "remove":
                plane.remove(service, backend)
            elif cmd == "drain":
                plane.drain(service, backend)
            elif cmd == "undrain":
                plane.undrain(service, backend)
            else:
                plane.set_weight(service, backend, _weight(request.get("weight")))
            return None
        raise ControlError(f"unknown command {cmd!r}")


def _field(request: dict[str, Any], name: str) -> str:
    value = request.get(name)
    if not isinstance(value, str):
        raise ControlError(f'"{name}" is missing')
    return value


def _weight(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(f"weight {value!r} is not a whole number")
    return value


def _address_port(text: str, what: str) -> tuple[Address, int]:
    """'10.0.0.1:40000' or '[2001:db8::1]:40000'."""
    try:
        host, port = split_host_port(text)
        address = as_address(host)
        number = int(port) if port is not None else -1
    except ValueError:
        raise ControlError(f"{what} {text!r} is not IP:PORT or [IPv6]:PORT") from None
    if not 0 <= number <= 0xFFFF:
        raise ControlError(f"{what} {text!r} is not IP:PORT or [IPv6]:PORT")
    return address, number


def _flow(request: dict[str, Any]) -> FlowKey:
    client, sport = _address_port(_field(request, "client"), "client")
    vip, dport = _address_port(_field(request, "service"), "service")
    protocol = str(request.get("protocol") or "tcp").lower()
    if protocol not in ("tcp", "udp"):
        raise ControlError(f"protocol {protocol!r} is not tcp or udp")
    if client.version != vip.version:
        raise ControlError(f"client {client} and service {vip} are not of one family (IPv4 or IPv6)")
    return FlowKey(client, vip, int(ServiceProtocol[protocol.upper()]), sport, dport)


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        peer = peer_pid(self.connection)
        while True:
            line = self.rfile.readline(MAX_REQUEST + 1)
            if not line:
                return
            if len(line) > MAX_REQUEST:
                self._send({"ok": False, "error": "request too long"})
                return
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except ValueError:
                self._send({"ok": False, "error": "request is not JSON"})
                continue
            answer = self.server.commands.handle(request, peer)
            self.server.commands.settle(request, answer, self._send(answer))

    def _send(self, answer: dict[str, Any]) -> bool:
        """Write one answer; False when the client went away (there is nobody to tell)."""
        try:
            self.wfile.write(json.dumps(answer).encode() + b"\n")
            self.wfile.flush()
        except OSError:
            return False
        return True


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    commands: Commands


class ControlServer:
    """Serves `commands` on a unix socket at `path` in a background thread until stop()."""

    def __init__(self, path: str, commands: Commands) -> None:
        self.path = path
        self.commands = commands
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        parent = os.path.dirname(self.path) or "."
        os.makedirs(parent, mode=0o755, exist_ok=True)
        _clear_stale(self.path)
        server = _Server(self.path, _Handler, bind_and_activate=False)
        server.commands = self.commands
        try:
            server.server_bind()
            # Before listen(): until then a connect() is refused, so no one connects to a 0666 socket.
            os.chmod(self.path, 0o600)
            server.server_activate()
        except BaseException:
            server.server_close()
            raise
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="rr-control", daemon=True)
        self._thread.start()
        log.info("control socket at %s", self.path, extra={"socket": self.path})

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _clear_stale(path: str) -> None:
    """Remove a socket left by a daemon that died; refuse if one answers, or if the path is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path}: another rusty-rail is running (its control socket answers)")
