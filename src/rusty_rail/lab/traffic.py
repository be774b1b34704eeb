"""Real HTTP GETs from inside a client namespace to the VIP; one new TCP connection (flow) each.

Run in the namespace (`python -m rusty_rail.lab.traffic --host 10.1.0.1 -n 20`): prints one JSON
object per request. `Lab.traffic()` runs it and parses the lines into `Result`s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass



@dataclass(frozen=True)
class Result:
    ok: bool
    server: str | None  # X-Served-By of the reply
    sport: int | None  # the client's source port: with the addresses, the flow's 5-tuple
    status: int | None
    size: int  # body bytes received
    seconds: float
    error: str | None = None


def get(host: str, port: int, path: str, timeout: float, upload: int = 0) -> Result:
    """One request on a new connection: GET path, or POST upload bytes of payload() when upload > 0."""
    from .httpd import payload  # here, so `python -m rusty_rail.lab.httpd` does not import itself twice

    start = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    sport = None
    try:
        conn.connect()
        assert conn.sock is not None
        sport = conn.sock.getsockname()[1]
        if upload:
            conn.request("POST", path, body=payload(upload))
        else:
            conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        server = resp.getheader("X-Served-By")
        ok = resp.status == 200
        error = None
        if ok and upload and body.split()[1:] != [str(upload).encode(), b"ok"]:
            ok, error = False, f"server saw {body!r}"
        elif ok and not upload and path.startswith("/bytes/") and body != payload(int(path[len("/bytes/"):])):
            ok, error = False, "body differs from the expected pattern"
        return Result(ok, server, sport, resp.status, len(body), time.monotonic() - start, error)
    except (OSError, http.client.HTTPException) as e:
        return Result(False, None, sport, None, 0, time.monotonic() - start, f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def run(host: str, n: int, port: int = 80, path: str = "/", timeout: float = 5.0,
        upload: int = 0) -> Iterator[Result]:
    for _ in range(n):
        yield get(host, port, path, timeout, upload)


def parse(lines: str) -> list[Result]:
    return [Result(**json.loads(line)) for line in lines.splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rusty_rail.lab.traffic")
    p.add_argument("--host", default="10.1.0.1")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--path", default="/")
    p.add_argument("-n", type=int, default=10)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--upload", type=int, default=0, help="POST this many bytes instead of a GET")
    a = p.parse_args(argv)
    socket.setdefaulttimeout(a.timeout)
    for r in run(a.host, a.n, a.port, a.path, a.timeout, a.upload):
        print(json.dumps(asdict(r)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
