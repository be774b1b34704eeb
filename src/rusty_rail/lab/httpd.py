"""A tiny HTTP server for the lab's backends: every answer names the server, so clients can tell.

    GET /            -> "<name>\\n"
    GET /bytes/<n>   -> n bytes of a fixed pattern (to push large, multi-segment replies through DSR)
    GET /paced/<n>/<s> -> the same n bytes, written in slices spread over about s seconds: a long-lived
                        stream (the resilience tests kill a balancer or add a backend while it runs)
    POST /           -> "<name> <n> <ok>\n": the n bytes received, ok when they are payload(n)
                        (large uploads push multi-segment, GSO-sized packets through the GRE encap)

Every reply carries `X-Served-By: <name>`. Started inside a server namespace, either binding itself
or (from the lab) with an already listening socket passed as --fd, so the lab knows it is ready as
soon as the process starts: connections queue in the listen backlog.

HTTP/1.1: a client may keep its connection and send more requests on it (keep-alive), so tests can
hold one real TCP connection through the balancer across drains and backend changes. The lab binds
[::]:80 dual-stack, so the server answers on both VIPs (through GRE) and on its own addresses (health
checks), over IPv4 and IPv6.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATTERN = bytes(range(256))


def payload(n: int) -> bytes:
    """The body of /bytes/<n>; traffic.py checks replies against it."""
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


class _Handler(BaseHTTPRequestHandler):
    server_name_: str = "?"
    protocol_version = "HTTP/1.1"  # keep-alive; every reply has a Content-Length

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.startswith("/paced/"):
            self._paced()
            return
        if self.path.startswith("/bytes/"):
            try:
                body = payload(int(self.path[len("/bytes/"):]))
            except ValueError:
                self.send_error(400)
                return
        else:
            body = f"{self.server_name_}\n".encode()
        self.send_response(200)
        self.send_header("X-Served-By", self.server_name_)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _paced(self) -> None:
        try:
            n_text, s_text = self.path[len("/paced/"):].split("/")
            n, seconds = int(n_text), float(s_text)
        except ValueError:
            self.send_error(400)
            return
        body = payload(n)
        self.send_response(200)
        self.send_header("X-Served-By", self.server_name_)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        self.wfile.flush()
        slices = max(1, min(n // 1024, int(seconds * 20)))  # about 20 writes a second
        start = time.monotonic()
        for i in range(slices):
            # Pacing a stream, not synchronising: slice i leaves at i/slices of the duration.
            delay = start + seconds * i / slices - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.wfile.write(body[n * i // slices : n * (i + 1) // slices])
            self.wfile.flush()

    def do_POST(self) -> None:  # noqa: N802
        n = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(n)
        body = f"{self.server_name_} {len(data)} {'ok' if data == payload(n) else 'bad'}\n".encode()
        self.send_response(200)
        self.send_header("X-Served-By", self.server_name_)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet: the lab runs many requests
        pass


def serve(name: str, sock: socket.socket) -> None:
    """Serve on a listening socket of either family (the lab's is dual-stack: IPv6, V6ONLY off)."""
    handler = type("Handler", (_Handler,), {"server_name_": name})
    server = type("Server", (ThreadingHTTPServer,), {"address_family": sock.family})
    srv = server(sock.getsockname()[:2], handler, bind_and_activate=False)
    srv.socket.close()
    srv.socket = sock
    srv.daemon_threads = True
    srv.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rusty_rail.lab.httpd")
    p.add_argument("--name", required=True)
    p.add_argument("--fd", type=int, help="an inherited, listening TCP socket")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, default=80)
    a = p.parse_args(argv)
    if a.fd is not None:
        sock = socket.socket(fileno=a.fd)
    else:
        sock = socket.create_server((a.bind, a.port), reuse_port=False, backlog=128)
    try:
        serve(a.name, sock)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
