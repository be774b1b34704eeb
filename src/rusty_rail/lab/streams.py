"""Many long-lived TCP transfers at once from a client namespace, every byte checked.

    python -m rusty_rail.lab.streams --host 10.1.0.1 -n 64 --size 2000000 --seconds 4 --uploads 16

opens n connections to the VIP; n - uploads of them GET /paced/<size>/<seconds> (a download the server
spreads over about that many seconds, see httpd.py), the others POST `size` bytes of the same pattern,
paced the same way by this client (so their data passes the balancers, not only their ACKs). One JSON
object per line on stdout:

    {"event": "connected", "index": i, "sport": p, "kind": "download"|"upload"}   each connection
    {"event": "flowing", "least_moved": b, "ended": k}     every connection moved at least --flowing bytes
                                                           (or ended: k of them, which then failed)
    {"event": "done", "index": i, "sport": p, "kind": ..., "ok": ..., "server": ..., "size": ..., "seconds": ...,
     "t": ..., "error": ...}                               each connection, as it ends (t: CLOCK_MONOTONIC)
    {"event": "finished"}

A download is ok when the status is 200 and the body is exactly payload(size); an upload when the
server says it received `size` bytes equal to payload(size). `Lab.streams()` starts it and returns a
`Streams` to follow it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .events import Events

_CHUNK = 65536


class Streams(Events):
    """The test side: follows the events of the process Lab.streams() started."""


# -- the client side, in the namespace -------------------------------------------------------------


class _Checker:
    """Compares received bytes with payload(size) slice by slice, without building the whole body."""

    def __init__(self) -> None:
        from .httpd import PATTERN

        self.ring = PATTERN * (_CHUNK // len(PATTERN) + 2)
        self.offset = 0
        self.good = True

    def feed(self, data: bytes) -> None:
        start = self.offset % 256
        if data != self.ring[start : start + len(data)]:
            self.good = False
        self.offset += len(data)


def _emit(lock: threading.Lock, **event: Any) -> None:
    with lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def _paced_body(size: int, seconds: float, moved: list[int], index: int) -> Iterator[bytes]:
    from .httpd import payload

    body = payload(size)
    slices = max(1, min(size // 1024, int(seconds * 20)))
    start = time.monotonic()
    for i in range(slices):
        delay = start + seconds * i / slices - time.monotonic()  # pacing the stream, not synchronising
        if delay > 0:
            time.sleep(delay)
        piece = body[size * i // slices : size * (i + 1) // slices]
        yield piece
        moved[index] += len(piece)


def _one(index: int, kind: str, a: argparse.Namespace, moved: list[int], started: threading.Event,
         lock: threading.Lock) -> None:
    t0 = time.monotonic()
    sport = None
    server = None
    size = 0
    conn = http.client.HTTPConnection(a.host, a.port, timeout=a.timeout)
    try:
        try:
            conn.connect()
            assert conn.sock is not None
            sport = conn.sock.getsockname()[1]
        finally:
            started.set()
        _emit(lock, event="connected", index=index, sport=sport, kind=kind)
        if kind == "download":
            conn.request("GET", f"/paced/{a.size}/{a.seconds}")
            resp = conn.getresponse()
            server = resp.getheader("X-Served-By")
            check = _Checker()
            while chunk := resp.read(_CHUNK):
                check.feed(chunk)
                moved[index] += len(chunk)
            size = check.offset
            ok = resp.status == 200 and check.good and size == a.size
            error = None if ok else f"status {resp.status}, {size} bytes, pattern {'ok' if check.good else 'differs'}"
        else:
            conn.putrequest("POST", "/")
            conn.putheader("Content-Length", str(a.size))
            conn.endheaders()
            for piece in _paced_body(a.size, a.seconds, moved, index):
                conn.send(piece)
            resp = conn.getresponse()
            server = resp.getheader("X-Served-By")
            answer = resp.read().split()
            size = int(answer[1]) if len(answer) == 3 else 0
            ok = resp.status == 200 and answer[1:] == [str(a.size).encode(), b"ok"]
            error = None if ok else f"status {resp.status}, server said {answer!r}"
    except (OSError, http.client.HTTPException) as e:
        ok, error = False, f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    t = time.monotonic()
    _emit(lock, event="done", index=index, sport=sport, kind=kind, ok=ok, server=server, size=size,
          seconds=round(t - t0, 3), t=t, error=error)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rusty_rail.lab.streams")
    p.add_argument("--host", default="10.1.0.1")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("-n", type=int, default=50, help="connections")
    p.add_argument("--uploads", type=int, default=0, help="how many of them POST instead of GET")
    p.add_argument("--size", type=int, default=2_000_000, help="bytes per transfer")
    p.add_argument("--seconds", type=float, default=4.0, help="each transfer spread over about this long")
    p.add_argument("--flowing", type=int, default=65536, help="bytes every connection moves before 'flowing'")
    p.add_argument("--timeout", type=float, default=20.0, help="socket timeout (a stall longer than this fails)")
    a = p.parse_args(argv)
    lock = threading.Lock()
    moved = [0] * a.n
    threads = []
    uploads = {k * a.n // a.uploads for k in range(min(a.uploads, a.n))} if a.uploads > 0 else set()
    for i in range(a.n):
        started = threading.Event()
        kind = "upload" if i in uploads else "download"
        t = threading.Thread(target=_one, name=kind, args=(i, kind, a, moved, started, lock), daemon=True)
        t.start()
        threads.append(t)
        started.wait(a.timeout)  # connect one at a time: no SYN burst, each has its port when the next starts
    need = min(a.flowing, a.size)
    while any(t.is_alive() for t in threads) and not all(m >= need for m in moved):
        time.sleep(0.01)  # polling progress counters
    _emit(lock, event="flowing", least_moved=min(moved), ended=sum(not t.is_alive() for t in threads))
    for t in threads:
        t.join()
    _emit(lock, event="finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
