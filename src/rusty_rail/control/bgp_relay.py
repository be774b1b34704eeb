"""The link between a balancer daemon and its BGP speaker (ExaBGP), run by ExaBGP as its API process.

    exabgp.conf:  process rusty-rail { run <python> -m rusty_rail.control.bgp_relay --socket PATH; encoder json; }

ExaBGP reads API commands ("announce route ...") from this process's stdout and writes its events (JSON:
session states, "done"/"error" acknowledgements) to its stdin. The daemon connects to PATH (a unix
socket, 0600) and speaks JSON lines:

    daemon -> relay  {"exabgp": "announce route 10.1.0.1/32 next-hop self"}   relayed to ExaBGP
                     {"hold": 30}        a handover is coming: outlive me for up to 30 s
                     {"shutdown": true}  planned stop: ExaBGP closes its sessions and exits
    relay -> daemon  {"hello": {"exabgp_pid": N, "routes": [...], "peers": {...}}}   on connect
                     {"exabgp": "<a line ExaBGP wrote>"}

The session dies with the daemon: when the daemon's connection closes without a "hold" first (it
exited, or was killed: the kernel closes its sockets either way), the relay tells ExaBGP "shutdown",
which sends each router a NOTIFICATION (Cease) and closes the sessions, so the routers drop the
balancer's routes at once. After a "hold" it waits for the next daemon (the hitless restart's new one)
and hands it the speaker, its sessions and routes untouched; nobody by the deadline: shutdown. A relay
that no daemon ever reaches (the daemon died while starting it) shuts down the same way.

Standard library only, so it starts fast; it never imports the rest of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

FIRST_CONNECT_S = 30.0
"""How long a new relay waits for its daemon before giving up (shutdown)."""


class Relay:
    def __init__(self, path: str, out: Any = None) -> None:
        self.path = path
        self.out = out if out is not None else sys.stdout
        self.routes: dict[str, str] = {}  # prefix -> the announce command in force
        self.peers: dict[str, Any] = {}  # peer address -> ExaBGP's last state event for it
        self.daemon: socket.socket | None = None
        self.hold_s: float | None = None
        self.deadline: float | None = time.monotonic() + FIRST_CONNECT_S
        self.stopping = False
        self._buffer = b""

    def to_exabgp(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()
        words = line.split()
        if len(words) >= 3 and words[1] == "route":
            if words[0] == "announce":
                self.routes[words[2]] = line
            elif words[0] == "withdraw":
                self.routes.pop(words[2], None)

    def from_exabgp(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            event = None  # "done", "error", "shutdown in progress": acknowledgements
        if isinstance(event, dict) and event.get("type") == "state":
            peer = event.get("neighbor", {}).get("address", {}).get("peer")
            if peer:
                self.peers[peer] = event
        self.send({"exabgp": line})

    def send(self, message: dict[str, Any]) -> None:
        if self.daemon is None:
            return
        try:
            self.daemon.sendall(json.dumps(message).encode() + b"\n")
        except OSError:
            self.lost_daemon()

    def accept(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        if self.daemon is not None or self.stopping:
            conn.close()  # one daemon at a time
            return
        self.daemon, self.deadline, self.hold_s, self._buffer = conn, None, None, b""
        self.send({"hello": {"exabgp_pid": os.getppid(), "routes": sorted(self.routes.values()), "peers": self.peers}})

    def from_daemon(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n", 1)
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if isinstance(message.get("exabgp"), str) and "\n" not in message["exabgp"]:
                self.to_exabgp(message["exabgp"])
            elif isinstance(message.get("hold"), (int, float)):
                self.hold_s = float(message["hold"])
            elif message.get("shutdown"):
                self.shutdown()

    def lost_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.close()
            self.daemon = None
        if self.hold_s is not None and not self.stopping:
            self.deadline = time.monotonic() + self.hold_s  # a handover: wait for the next daemon
        else:
            self.shutdown()

    def shutdown(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.to_exabgp("shutdown")


def _listen(path: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)  # before listen(): nobody connects to it while it is looser
    listener.listen(2)
    return listener


def run(path: str) -> int:
    # ExaBGP stops its API process with SIGTERM: leave through `finally`, removing the socket.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    relay = Relay(path)
    listener = _listen(path)
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "exabgp")
    sel.register(listener, selectors.EVENT_READ, "listener")
    pending = b""
    try:
        while True:
            if relay.deadline is not None and time.monotonic() > relay.deadline and not relay.stopping:
                relay.shutdown()  # no daemon came (or came back): the routes go
            for key, _ in sel.select(timeout=0.2):
                if key.data == "exabgp":
                    chunk = os.read(sys.stdin.fileno(), 65536)
                    if not chunk:
                        return 0  # ExaBGP is gone (it closes our stdin when it stops)
                    pending += chunk
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        relay.from_exabgp(line.decode(errors="replace").rstrip())
                elif key.data == "listener":
                    had = relay.daemon
                    relay.accept(listener)
                    if relay.daemon is not None and relay.daemon is not had:
                        sel.register(relay.daemon, selectors.EVENT_READ, "daemon")
                else:
                    conn = relay.daemon
                    data = conn.recv(65536) if conn is not None else b""
                    if data:
                        relay.from_daemon(data)
                    elif conn is not None:
                        sel.unregister(conn)
                        relay.lost_daemon()
            if relay.daemon is None:
                for key in list(sel.get_map().values()):
                    if key.data == "daemon":
                        sel.unregister(key.fileobj)
    finally:
        listener.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rusty_rail.control.bgp_relay")
    p.add_argument("--socket", required=True, help="the unix socket the daemon connects to")
    return run(p.parse_args(argv).socket)


if __name__ == "__main__":
    sys.exit(main())
