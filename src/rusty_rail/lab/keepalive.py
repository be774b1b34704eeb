"""One long-lived HTTP/1.1 connection from a client namespace, driven line by line over stdin.

    python -m rusty_rail.lab.keepalive --host 10.1.0.1      # connects, prints {"sport": N, ...}
    get /            -> one request on the same connection; prints one JSON Result (traffic.py)
    <EOF>            -> closes the connection and exits

`Lab.keepalive()` starts it in a namespace and returns a `KeepAlive` to drive it. A connection that
broke is reported as a failed Result (and is not reopened: the point is to keep the one flow).
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Self

from .traffic import Result


class LineClient:
    """The test side of a client process driven by lines on stdin, answering one JSON line each."""

    what = "client"

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        self.proc = proc
        self.timeout = timeout

    def _line(self) -> object:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the client answers within its own socket timeout
        if not line:
            raise ConnectionError(f"{self.what} exited ({self.proc.poll()})")
        return json.loads(line)

    def _ask(self, command: str) -> object:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n".encode())
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KeepAlive(LineClient):
    """Wraps the process Lab.keepalive() started: one connection."""

    what = "keep-alive client"

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        super().__init__(proc, timeout)
        hello = self._line()
        if not isinstance(hello, dict) or "sport" not in hello:
            self.close()
            raise ConnectionError(f"keep-alive client could not connect: {hello}")
        self.sport: int = hello["sport"]

    def get(self, path: str = "/") -> Result:
        answer = self._ask(f"get {path}")
        assert isinstance(answer, dict)
        return Result(**answer)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rusty_rail.lab.keepalive")
    p.add_argument("--host", default="10.1.0.1")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args(argv)
    conn = http.client.HTTPConnection(a.host, a.port, timeout=a.timeout)
    try:
        conn.connect()
    except OSError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    assert conn.sock is not None
    sport = conn.sock.getsockname()[1]
    print(json.dumps({"sport": sport}), flush=True)
    broken: str | None = None
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        path = words[1] if len(words) > 1 else "/"
        start = time.monotonic()
        if broken is not None:
            result = Result(False, None, sport, None, 0, 0.0, f"connection already broken: {broken}")
        else:
            try:
                # http.client would silently reconnect after a close; this must stay one flow.
                conn.auto_open = 0
                conn.request("GET", path, headers={"Connection": "keep-alive"})
                resp = conn.getresponse()
                body = resp.read()
                result = Result(resp.status == 200, resp.getheader("X-Served-By"), sport, resp.status, len(body),
                                time.monotonic() - start)
                if resp.will_close:
                    broken = "the server closed the connection"
            except (OSError, http.client.HTTPException) as e:
                broken = f"{type(e).__name__}: {e}"
                result = Result(False, None, sport, None, 0, time.monotonic() - start, broken)
        print(json.dumps(asdict(result)), flush=True)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
