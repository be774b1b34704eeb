"""Reachability probes run inside a lab namespace: is the balancer's host still answering?

    python -m rusty_rail.lab.probe ping ADDRESS          # one ICMP or ICMPv6 echo (raw socket; no ping binary)
    python -m rusty_rail.lab.probe tcp ADDRESS PORT      # connect, read the greeting
    python -m rusty_rail.lab.probe listen PORT           # serve a greeting to each connection (IPv4 and IPv6)
    python -m rusty_rail.lab.probe reach PORT ADDRESS... # ping, then tcp, each address (one process for all)

Exit 0 on success, 1 with one line on failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Sequence

from rusty_rail.core.checksum import internet_checksum

GREETING = b"rusty-rail-probe\n"


def ping(address: str, timeout: float = 3.0) -> float:
    """Round-trip seconds of one ICMP echo (RFC 792) or ICMPv6 echo (RFC 4443, for an IPv6 `address`)."""
    six = ipaddress.ip_address(address).version == 6
    ident = os.getpid() & 0xFFFF
    request, reply = (128, 129) if six else (8, 0)
    body = bytes([request, 0, 0, 0]) + ident.to_bytes(2, "big") + b"\x00\x01" + b"rusty-rail"
    if not six:  # the kernel computes an ICMPv6 raw socket's checksum itself (RFC 3542 3.1)
        body = body[:2] + internet_checksum(body).to_bytes(2, "big") + body[4:]
    family, proto = (socket.AF_INET6, socket.IPPROTO_ICMPV6) if six else (socket.AF_INET, socket.IPPROTO_ICMP)
    with socket.socket(family, socket.SOCK_RAW, proto) as s:
        start = time.monotonic()
        s.sendto(body, (address, 0))
        deadline = start + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                packet = s.recv(2048)
            except TimeoutError:
                break
            # A raw IPv4 socket hands over the IP header too; an IPv6 one only the ICMPv6 message.
            icmp = packet if six else packet[(packet[0] & 0x0F) * 4 :]
            if icmp[0] == reply and icmp[4:6] == ident.to_bytes(2, "big"):
                return time.monotonic() - start
    raise TimeoutError(f"no echo reply from {address} within {timeout}s")


def tcp(address: str, port: int, timeout: float = 3.0) -> bytes:
    with socket.create_connection((address, port), timeout=timeout) as s:
        return s.recv(len(GREETING))


def listen(port: int) -> None:
    with socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True, reuse_port=True) as server:
        print("listening", flush=True)  # the caller waits for this line, not for a sleep
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(GREETING)


def _greeted(address: str, port: int) -> None:
    got = tcp(address, port)
    if got != GREETING:
        raise ConnectionError(f"unexpected greeting {got!r} from {address}:{port}")
    print(f"tcp {address}:{port} answered")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rusty_rail.lab.probe")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ping").add_argument("address")
    t = sub.add_parser("tcp")
    t.add_argument("address")
    t.add_argument("port", type=int)
    sub.add_parser("listen").add_argument("port", type=int)
    r = sub.add_parser("reach")
    r.add_argument("port", type=int)
    r.add_argument("addresses", nargs="+")
    a = p.parse_args(argv)
    try:
        if a.cmd == "ping":
            print(f"reply from {a.address} in {ping(a.address) * 1000:.2f} ms")
        elif a.cmd == "tcp":
            _greeted(a.address, a.port)
        elif a.cmd == "reach":
            for address in a.addresses:
                print(f"reply from {address} in {ping(address) * 1000:.2f} ms")
                _greeted(address, a.port)
        else:
            listen(a.port)
    except OSError as exc:
        print(f"probe {a.cmd} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
