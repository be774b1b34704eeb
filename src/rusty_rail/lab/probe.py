"""Reachability probes run inside a lab namespace: is the balancer's host still answering?

    python -m rusty_rail.lab.probe ping ADDRESS          # one ICMP echo (raw socket; no ping binary here)
    python -m rusty_rail.lab.probe tcp ADDRESS PORT      # connect, read the greeting
    python -m rusty_rail.lab.probe listen PORT           # serve a greeting to each connection

Exit 0 on success, 1 with one line on failure.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Sequence

from rusty_rail.core.checksum import internet_checksum

GREETING = b"rusty-rail-probe\n"


def ping(address: str, timeout: float = 3.0) -> float:
    """Round-trip seconds of one ICMP echo to `address`."""
    ident = os.getpid() & 0xFFFF
    body = bytes([8, 0, 0, 0]) + ident.to_bytes(2, "big") + b"\x00\x01" + b"rusty-rail"
    body = body[:2] + internet_checksum(body).to_bytes(2, "big") + body[4:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        start = time.monotonic()
        s.sendto(body, (address, 0))
        deadline = start + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                packet = s.recv(2048)
            except TimeoutError:
                break
            icmp = packet[(packet[0] & 0x0F) * 4 :]
            if icmp[0] == 0 and icmp[4:6] == ident.to_bytes(2, "big"):
                return time.monotonic() - start
    raise TimeoutError(f"no echo reply from {address} within {timeout}s")


def tcp(address: str, port: int, timeout: float = 3.0) -> bytes:
    with socket.create_connection((address, port), timeout=timeout) as s:
        return s.recv(len(GREETING))


def listen(port: int) -> None:
    with socket.create_server(("0.0.0.0", port), reuse_port=True) as server:
        print("listening", flush=True)  # the caller waits for this line, not for a sleep
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(GREETING)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rusty_rail.lab.probe")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ping").add_argument("address")
    t = sub.add_parser("tcp")
    t.add_argument("address")
    t.add_argument("port", type=int)
    sub.add_parser("listen").add_argument("port", type=int)
    a = p.parse_args(argv)
    try:
        if a.cmd == "ping":
            print(f"reply from {a.address} in {ping(a.address) * 1000:.2f} ms")
        elif a.cmd == "tcp":
            got = tcp(a.address, a.port)
            if got != GREETING:
                raise ConnectionError(f"unexpected greeting {got!r}")
            print(f"tcp {a.address}:{a.port} answered")
        else:
            listen(a.port)
    except OSError as exc:
        print(f"probe {a.cmd} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
