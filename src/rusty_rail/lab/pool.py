"""Many long-lived HTTP/1.1 connections from one client namespace, driven together over stdin.

    python -m rusty_rail.lab.pool --host 10.1.0.1 -n 40    # connects all, prints {"sports": [...]}
    get /       -> one request on every connection (in parallel); prints one JSON list of Results
    <EOF>       -> closes them all and exits

keepalive.py holds one connection per process; this holds many in one (a test with forty connections
does not start forty interpreters). A connection that broke is reported as failed from then on and is
never reopened: the point is to keep each flow. `Lab.pool()` starts it and returns a `Pool`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from .keepalive import LineClient
from .traffic import Result


class Pool(LineClient):
    """The test side: wraps the process Lab.pool() started."""

    what = "pool client"

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        super().__init__(proc, timeout)
        hello = self._line()
        if not isinstance(hello, dict) or "sports" not in hello:
            self.close()
            raise ConnectionError(f"pool client could not connect: {hello}")
        self.sports: list[int] = hello["sports"]

    def get(self, path: str = "/") -> list[Result]:
        """One request on every connection; Results in connection order."""
        answer = self._ask(f"get {path}")
        assert isinstance(answer, list)
        return [Result(**r) for r in answer]


class _Conn:
    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self.conn.connect()
        self.conn.auto_open = 0  # http.client would silently reconnect after a close: this must stay one flow
        assert self.conn.sock is not None
        self.sport: int = self.conn.sock.getsockname()[1]
        self.broken: str | None = None

    def get(self, path: str) -> Result:
        start = time.monotonic()
        if self.broken is not None:
            return Result(False, None, self.sport, None, 0, 0.0, f"connection already broken: {self.broken}")
        try:
            self.conn.request("GET", path, headers={"Connection": "keep-alive"})
            resp = self.conn.getresponse()
            body = resp.read()
            result = Result(resp.status == 200, resp.getheader("X-Served-By"), self.sport, resp.status, len(body),
                            time.monotonic() - start)
            if resp.will_close:
                self.broken = "the server closed the connection"
            return result
        except (OSError, http.client.HTTPException) as e:
            self.broken = f"{type(e).__name__}: {e}"
            return Result(False, None, self.sport, None, 0, time.monotonic() - start, self.broken)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rusty_rail.lab.pool")
    p.add_argument("--host", default="10.1.0.1")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("-n", type=int, default=10)
    p.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args(argv)
    try:
        conns = [_Conn(a.host, a.port, a.timeout) for _ in range(a.n)]
    except OSError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps({"sports": [c.sport for c in conns]}), flush=True)
    with ThreadPoolExecutor(max_workers=min(16, a.n)) as ex:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            path = words[1] if len(words) > 1 else "/"
            results = list(ex.map(lambda c: c.get(path), conns))
            print(json.dumps([asdict(r) for r in results]), flush=True)
    for c in conns:
        c.conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
