"""The lab router's balancer checker: stop sending GRE to a balancer whose process died.

    python -m rusty_rail.lab.router_health --pins <DEFAULT_PIN_ROOT>/<prefix>router \\
        --port 9100 --interval 0.1 --fall 2 --rise 2 192.168.137.11 192.168.137.12

Runs in the router's namespace, entered with `nsenter --net` so the host's bpffs (the router's pinned
maps) stays visible. Each balancer is probed by a thread of its own, every `interval` seconds, with
something the balancer *process* serves: by default an HTTP GET of its Prometheus endpoint
(RR_METRICS / `metrics =`), which only answers while the daemon runs and is not wedged; `--probe tcp`
only connects. ICMP would not do: the balancer's host keeps answering pings after the process died.

`fall` failures in a row take a balancer out of the router's target map (rr_encap_tgts + count: the
encap program's `hash % count` then spreads its flows over the others, whose Maglev tables send them
to the same backends); `rise` successes put it back, in its original place in the list. One JSON line
per event on stdout, times from CLOCK_MONOTONIC (the same clock as any other process's
time.monotonic()):

    {"event": "ready", "up": [...], "targets": [...], "t": ...}          after every balancer's first probe
    {"event": "down"|"up", "balancer": a, "reason": r, "t_detected": ..., "t_map": ..., "targets": [...]}

SIGTERM stops it; the map keeps its last contents.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .router import RouterMaps


class Checker:
    def __init__(self, maps: RouterMaps, balancers: Sequence[str], port: int, *, interval: float,
                 timeout: float, fall: int, rise: int, probe: str = "http", path: str = "/metrics") -> None:
        self.maps = maps
        self.balancers = list(balancers)
        self.port, self.interval, self.timeout = port, interval, timeout
        self.fall, self.rise = fall, rise
        self.probe_kind, self.path = probe, path
        self.service_net, self.src, _ = maps.config()
        self.up = {b: True for b in self.balancers}  # as the router has them when we start
        self._streak = {b: 0 for b in self.balancers}  # consecutive results against the current state
        self._probed: set[str] = set()
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def probe(self, address: str) -> str | None:
        """None when the balancer process answered, else why not."""
        try:
            if self.probe_kind == "tcp":
                socket.create_connection((address, self.port), timeout=self.timeout).close()
                return None
            conn = http.client.HTTPConnection(address, self.port, timeout=self.timeout)
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    return f"HTTP {resp.status}"
                # Answering is not enough: a starting daemon serves metrics before its engine forwards.
                return "not ready" if b"\nrusty_rail_ready 0.0" in b"\n" + body else None
            finally:
                conn.close()
        except (OSError, http.client.HTTPException) as e:
            return f"{type(e).__name__}: {e}"

    def _targets(self) -> list[str]:
        return [b for b in self.balancers if self.up[b]]

    def _result(self, address: str, failure: str | None) -> None:
        now = time.monotonic()
        with self._lock:
            healthy = failure is None
            first = address not in self._probed
            self._probed.add(address)
            if healthy == self.up[address]:
                self._streak[address] = 0
            else:
                self._streak[address] += 1
                if self._streak[address] >= (self.rise if healthy else self.fall):
                    self._streak[address] = 0
                    self.up[address] = healthy
                    targets = self._targets()
                    self.maps.configure(self.service_net, self.src, targets)
                    _emit(event="up" if healthy else "down", balancer=address, reason=failure,
                          t_detected=now, t_map=time.monotonic(), targets=targets)
            if first and len(self._probed) == len(self.balancers):
                _emit(event="ready", up=self._targets(), targets=self.maps.config()[2], t=time.monotonic())

    def _loop(self, address: str) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            self._result(address, self.probe(address))
            next_at += self.interval
            # The probe period: a timer, not a synchronisation.
            self.stop.wait(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - self.interval)  # no burst of catch-up probes

    def run(self) -> None:
        threads = [threading.Thread(target=self._loop, args=(b,), name=f"probe-{b}", daemon=True)
                   for b in self.balancers]
        for t in threads:
            t.start()
        while not self.stop.wait(1.0):
            pass
        for t in threads:
            t.join(self.timeout + self.interval + 1)


_out = threading.Lock()


def _emit(**event: object) -> None:
    with _out:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rusty_rail.lab.router_health")
    p.add_argument("--pins", required=True, help="the router's pin directory (router.pin_dir(prefix))")
    p.add_argument("--port", type=int, default=9100, help="the balancers' metrics port")
    p.add_argument("--probe", choices=("http", "tcp"), default="http")
    p.add_argument("--path", default="/metrics")
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--timeout", type=float, default=0.5)
    p.add_argument("--fall", type=int, default=2)
    p.add_argument("--rise", type=int, default=2)
    p.add_argument("balancers", nargs="+", help="balancer addresses, in the router's order")
    a = p.parse_args(argv)
    checker = Checker(RouterMaps(Path(a.pins)), a.balancers, a.port, interval=a.interval, timeout=a.timeout,
                      fall=a.fall, rise=a.rise, probe=a.probe, path=a.path)
    signal.signal(signal.SIGTERM, lambda *_: checker.stop.set())
    signal.signal(signal.SIGINT, lambda *_: checker.stop.set())
    checker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
