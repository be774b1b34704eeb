"""Forked AF_PACKET workers and the pipes the supervisor drives them by.

Each worker is a forked process with its own socket, rings, Balancer and connection table, all joined in
one PACKET_FANOUT group whose classic-BPF program hashes the *inner* IPv4 addresses of the GRE packet
(cbpf.inner_flow_fanout_program): every packet of a flow lands on the same worker, and so on the same
connection table, while flows spread over workers. The kernel's own fanout hash is not used because the
skb hash is often set before the flow dissector runs (NIC RSS over the outer header: one router tunnel ->
one worker; a local sender's sk_txhash, which TCP re-rolls on retransmission timeouts -> a flow could move
between workers).

Requests go to every worker over its own pipe and the answers come back in worker order; the pool only
moves them, the engine decides what they mean.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from rusty_rail.dataplane import Counters, EngineError
from rusty_rail.engines.afpacket.worker import Worker

START_TIMEOUT = 30.0
REQUEST_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0

MakeWorker = Callable[[Connection], Worker]
"""Builds a worker in the forked child, given its end of the supervisor's pipe."""


def _die_with_parent() -> None:
    """Forked workers get SIGTERM if the supervisor dies (PR_SET_PDEATHSIG), so none is left behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class WorkerPool:
    """`count` forked workers; start() returns once every one listens on its rings."""

    def __init__(self, count: int, make: MakeWorker) -> None:
        self._ctx = multiprocessing.get_context("fork")
        self._make = make
        self._stop = self._ctx.Event()
        self._results: Any = self._ctx.Queue()
        self._pipes = [self._ctx.Pipe(duplex=True) for _ in range(count)]
        self._procs = [self._ctx.Process(target=self._child, args=(i,), name=f"rusty-rail-w{i}", daemon=True)
                       for i in range(count)]
        self._lock = threading.Lock()
        self._open = False

    # -- the child -----------------------------------------------------------------------------------

    def _child(self, index: int) -> None:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
        terminated = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: terminated.set())
        control = self._pipes[index][1]
        try:
            worker = self._make(control)
        except BaseException as exc:  # report, don't hang the supervisor
            self._results.put(("error", index, f"{type(exc).__name__}: {exc}"))
            return
        try:
            self._results.put(("ready", index, None))
            worker.loop(lambda: terminated.is_set() or self._stop.is_set())
            self._results.put(("final", index, worker.counters(ready=False)))
        finally:
            worker.close()

    # -- the supervisor ------------------------------------------------------------------------------

    def start(self) -> None:
        """Fork the workers and wait until each listens. Raises EngineError (the workers are stopped)."""
        for p in self._procs:
            p.start()
        ready = 0
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while ready < len(self._procs):
                try:
                    kind, index, detail = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    raise EngineError(f"AF_PACKET workers did not start within {START_TIMEOUT:g} s") from None
                if kind == "error":
                    raise EngineError(f"AF_PACKET worker {index} failed to start: {detail}")
                ready += 1
        except BaseException:
            self.stop()
            raise
        with self._lock:
            self._open = True

    def dead(self) -> list[int]:
        """Indices of workers that exited."""
        return [i for i, p in enumerate(self._procs) if p.pid is not None and not p.is_alive()]

    def ask(self, request: tuple[Any, ...], timeout: float = REQUEST_TIMEOUT) -> list[Any]:
        """Send `request` to every worker and return their answers, in worker order."""
        with self._lock:
            if not self._open:
                raise EngineError("the AF_PACKET workers are not running")
            controls = [parent for parent, _ in self._pipes]
            for control in controls:
                control.send(request)
            replies = []
            for index, control in enumerate(controls):
                if not control.poll(timeout):
                    raise TimeoutError(f"AF_PACKET worker {index} did not answer {request[0]!r} within {timeout:g} s")
                status, value = control.recv()
                if status != "ok":
                    raise EngineError(f"AF_PACKET worker {index}: {value}")
                replies.append(value)
            return replies

    def stop(self) -> list[Counters]:
        """Stop every worker; their final counters (of those that stopped in time)."""
        with self._lock:
            self._open = False
        self._stop.set()
        finals: list[Counters] = []
        started = [p for p in self._procs if p.pid is not None]
        deadline = time.monotonic() + STOP_TIMEOUT
        while len(finals) < len(started) and time.monotonic() < deadline:
            try:
                kind, _, detail = self._results.get(timeout=0.2)
            except queue.Empty:
                if not any(p.is_alive() for p in started):
                    break
                continue
            if kind == "final":
                finals.append(detail)
        for p in started:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for parent, child in self._pipes:
            parent.close()
            child.close()
        return finals
