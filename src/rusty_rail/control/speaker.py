"""The BGP speaker: ExaBGP (PyPI, a dependency of this package), run and watched by the daemon.

    speaker = Speaker(spec, router_id, local_address, run_dir, on_connect=..., on_event=...)
    speaker.start()                    # ExaBGP runs (or a held one is taken over); sessions come up by themselves
    speaker.send("announce route 10.1.0.1/32 next-hop self")     # or 2001:db8:1::1/128 next-hop <IPv6>
    speaker.hold(30) / speaker.shutdown()
    speaker.close()

ExaBGP reads the configuration written here (one neighbor per [[bgp.peers]]) and runs our relay
(bgp_relay.py) as its API process; this class talks to the relay over a unix socket in `run_dir`. The
relay, not a signal, ties the sessions to the daemon: the daemon's death closes the socket and the
relay shuts ExaBGP down (see bgp_relay.py), so a SIGKILLed daemon's routes go at once, while a
handover ("hold") keeps them for the next daemon. If ExaBGP or the relay dies, the link breaks: this
class logs it, stops what is left of that speaker, and starts a new one (1 s, then doubling up to 30 s);
the data plane never waits for any of it.

ExaBGP runs as root here: its default drops to `nobody`, who could neither run this package's Python
nor reach the 0600 socket. Under the systemd unit it has the daemon's capabilities and no more.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from rusty_rail.control.bgp_config import BgpSpec

log = logging.getLogger("rusty_rail.bgp")

RELAY_SOCKET = "relay.sock"
CONNECT_TIMEOUT_S = 20.0
"""How long a starting ExaBGP may take until its relay answers (Python start-up on a busy machine)."""
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0
_EXABGP_FAMILY_TABLE = ("the connection can not carry", "is not configured for", "no routes of this kind", "-----")


def render_exabgp(spec: BgpSpec, router_id: IPv4Address, local_address: IPv4Address, relay_argv: list[str]) -> str:
    """ExaBGP's configuration: the relay as API process, one neighbor per peer, no static routes
    (every route comes through the API, so a speaker that starts announces nothing until told). Each
    session offers IPv4 and IPv6 unicast (RFC 4760 capabilities) and nothing else: the IPv6 VIPs' routes
    go over the IPv4 session, with an IPv6 next hop; a router that takes no IPv6 routes simply leaves
    that family out of the session."""
    lines = ["process rusty-rail {", f"  run {' '.join(relay_argv)};", "  encoder json;", "}"]
    for peer in spec.peers:
        lines += [
            f"neighbor {peer.address} {{",
            f"  router-id {router_id};",
            f"  local-address {local_address};",
            f"  local-as {spec.local_as};",
            f"  peer-as {peer.asn};",
            f"  hold-time {peer.hold_time};",
            *([f'  md5-password "{peer.password}";'] if peer.password else []),
            "  family { ipv4 unicast; ipv6 unicast; }",
            "  api { processes [ rusty-rail ]; neighbor-changes; }",
            "}",
        ]
    return "\n".join(lines) + "\n"


def exabgp_environment() -> dict[str, str]:
    """ExaBGP's settings (its environment variables): foreground, no own CLI pipe, no privilege drop,
    logs on stdout for us to forward, acknowledgements of API commands."""
    return {
        "exabgp_daemon_daemonize": "false",
        "exabgp_daemon_drop": "false",
        "exabgp_api_cli": "false",
        "exabgp_api_ack": "true",
        "exabgp_api_respawn": "false",
        "exabgp_log_destination": "stdout",
        # Its INFO lines are mostly capability tables; session changes reach us as API events (logged
        # by the announcer), its warnings and errors as log lines.
        "exabgp_log_level": "WARNING",
        "exabgp_log_statistics": "false",
        "exabgp_log_packets": "false",
        "exabgp_log_routes": "false",
    }


class Speaker:
    def __init__(self, spec: BgpSpec, router_id: IPv4Address, local_address: IPv4Address, run_dir: Path,
                 on_connect: Callable[[dict[str, Any]], None], on_event: Callable[[dict[str, Any]], None],
                 python: str = sys.executable) -> None:
        """on_connect(hello) runs on every (re)connection with what the speaker holds (routes, peers);
        on_event(event) for each ExaBGP event (a JSON object; acknowledgements are dropped)."""
        self.spec = spec
        self.router_id, self.local_address = router_id, local_address
        self.run_dir = run_dir
        self.socket_path = run_dir / RELAY_SOCKET
        self.config_path = run_dir / "exabgp.conf"
        self.python = python
        self.on_connect, self.on_event = on_connect, on_event
        self.exabgp_pid: int | None = None
        self.restarts = 0
        self.connected = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the supervising thread; returns at once (sessions come up in the background)."""
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if len(str(self.socket_path).encode()) > 107:
            raise ValueError(f"{self.socket_path}: longer than a unix socket path may be (107 bytes); "
                             "shorten control_socket, whose directory holds it")
        self._thread = threading.Thread(target=self._supervise, name="rr-bgp-speaker", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        delay = RETRY_FIRST_S
        while not self._closing.is_set():
            started = time.monotonic()
            try:
                sock = self._adopt() or self._spawn()
                self._serve(sock)
            except OSError as exc:
                log.error("bgp speaker: %s", exc, extra={"event": "bgp_speaker_failed"})
            self.connected.clear()
            if self._closing.is_set():
                return  # close() decides what becomes of the speaker (shut down, or held for the next daemon)
            self._kill_leftovers()
            if time.monotonic() - started > RETRY_MAX_S:
                delay = RETRY_FIRST_S  # it ran a good while: not a crash loop
            self.restarts += 1
            log.warning("bgp speaker lost; starting a new one in %.0f s", delay,
                        extra={"event": "bgp_speaker_restart", "delay_s": delay})
            self._closing.wait(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def _adopt(self) -> socket.socket | None:
        """A speaker held for us by a daemon that handed over, with this configuration: take it."""
        if not self.socket_path.exists():
            return None
        try:
            held = self.config_path.read_text()
        except OSError:
            held = None
        try:
            sock = self._connect()
        except OSError:
            return None  # nobody there: a dead daemon's leftover
        if held == self._config_text():
            log.info("bgp speaker taken over from the previous daemon (its sessions and routes stay)",
                     extra={"event": "bgp_speaker_adopted"})
            return sock
        # Held for us, but with other peers or settings: shut it down now rather than let it hold its
        # sessions (and a second session from this address) until its hold runs out.
        with sock, sock.makefile("rb") as reader:
            hello = json.loads(reader.readline() or b"{}").get("hello", {})
            sock.sendall(json.dumps({"shutdown": True}).encode() + b"\n")
            self.exabgp_pid = hello.get("exabgp_pid")
            self._wait_exabgp_gone(10.0)
        log.info("bgp speaker held by the previous daemon shut down: the configuration changed",
                 extra={"event": "bgp_speaker_replaced"})
        self.exabgp_pid = None
        return None

    def _config_text(self) -> str:
        relay = [self.python, "-m", "rusty_rail.control.bgp_relay", "--socket", str(self.socket_path)]
        return render_exabgp(self.spec, self.router_id, self.local_address, relay)

    def _spawn(self) -> socket.socket:
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        self.config_path.write_text(self._config_text())
        # Its own session: a Ctrl-C meant for the daemon must not reach it; the relay decides its end.
        self._proc = subprocess.Popen([self.python, "-m", "exabgp", str(self.config_path)],
                                      env={**os.environ, **exabgp_environment()}, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._forward_logs, args=(self._proc,), name="rr-bgp-log", daemon=True).start()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                return self._connect()
            except OSError:
                if self._proc.poll() is not None:
                    raise OSError(f"ExaBGP exited with status {self._proc.returncode} before its relay answered "
                                  "(its output is in the log)") from None
                if time.monotonic() > deadline or self._closing.is_set():
                    raise OSError(f"ExaBGP's relay did not answer on {self.socket_path} within "
                                  f"{CONNECT_TIMEOUT_S:.0f} s") from None
                self._closing.wait(0.05)  # polling a starting process's socket, bounded by the deadline

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(self.socket_path))
        except OSError:
            sock.close()
            raise
        return sock

    def _forward_logs(self, proc: subprocess.Popen[bytes]) -> None:
        """ExaBGP's own warnings and errors into our log, less the table of address families a session
        cannot carry that it prints (as warnings) for every session it opens."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line and not any(noise in line for noise in _EXABGP_FAMILY_TABLE):
                log.warning("exabgp: %s", line, extra={"event": "exabgp_log"})

    def _serve(self, sock: socket.socket) -> None:
        """Read the relay until the link breaks."""
        self._sock = sock
        reader = sock.makefile("rb")
        try:
            for raw in reader:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if "hello" in message:
                    self.exabgp_pid = message["hello"].get("exabgp_pid")
                    self.connected.set()
                    self.on_connect(message["hello"])
                elif isinstance(message.get("exabgp"), str):
                    self._from_exabgp(message["exabgp"])
        finally:
            self._sock = None
            sock.close()
            reader.close()
        if not self._closing.is_set():
            log.error("bgp speaker: the link to ExaBGP broke (ExaBGP or its relay exited)",
                      extra={"event": "bgp_speaker_lost"})

    def _from_exabgp(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:  # an acknowledgement: "done", "error", "shutdown in progress"
            if line != "done":
                level = logging.WARNING if line == "error" else logging.INFO
                log.log(level, "exabgp answered: %s", line, extra={"event": "exabgp_answer"})
            return
        if isinstance(event, dict):
            self.on_event(event)

    def _kill_leftovers(self) -> None:
        """After the link broke: stop what is left of that speaker, so no orphan keeps announcing."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5)
            self._proc = None
        elif self.exabgp_pid:  # adopted: not our child
            try:
                os.kill(self.exabgp_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.exabgp_pid = None

    # -- commands ---------------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> bool:
        with self._send_lock:
            sock = self._sock
            if sock is None or not self.connected.is_set():
                return False
            try:
                sock.sendall(json.dumps(message).encode() + b"\n")
                return True
            except OSError:
                return False

    def send(self, command: str) -> bool:
        """One ExaBGP API command; False when no speaker is connected (the caller resends on connect)."""
        return self._send({"exabgp": command})

    def hold(self, seconds: float) -> bool:
        """A handover is coming: the relay keeps ExaBGP, its sessions and routes for the next daemon."""
        return self._send({"hold": seconds})

    def close(self, shutdown: bool = True, timeout: float = 5.0) -> None:
        """Stop supervising. shutdown: ExaBGP closes its sessions (Cease) and exits; else (after hold())
        it stays for the next daemon."""
        self._closing.set()
        if shutdown and self._send({"shutdown": True}):
            self._wait_exabgp_gone(timeout)
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        if shutdown:
            self._kill_leftovers()  # one that did not go by itself

    def _wait_exabgp_gone(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None:
                if self._proc.poll() is not None:
                    return
            elif self.exabgp_pid is None or not Path(f"/proc/{self.exabgp_pid}").exists():
                return
            time.sleep(0.02)  # polling a process's exit, bounded by the deadline
