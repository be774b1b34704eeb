"""The pure-Python data plane: TPACKET_V3 rings on one device, one or more worker processes.

This module only moves bytes: frames from the RX ring go to `decide(frame, now)`, and `Forward` verdicts
go into the TX ring of the same device. All packet logic is the balancer's (rusty_rail.core).

    engine = AfPacketEngine("eth1", balancer, workers=2, factory=make_balancer)
    engine.serve_forever()           # until SIGTERM / SIGINT; or engine.run(stop_event)

Workers: with workers > 1, each is a forked process with its own socket and rings, all joined in one
PACKET_FANOUT group whose classic-BPF program hashes the *inner* IPv4 addresses of the GRE packet (see
ring.inner_flow_fanout_program): every packet of a flow lands on the same worker, and so on the same
connection table, while flows spread over workers. The kernel's own fanout hash is not used because the
skb hash is often set before the flow dissector runs (NIC RSS over the outer header: one router tunnel ->
one worker; a local sender's sk_txhash, which TCP re-rolls on retransmission timeouts -> a flow could move
between workers). Each worker calls `factory()` after the fork to build its balancer, so tables are equal.

The host's stack never sees the balanced GRE: hostfilter.install() drops it at netdev ingress, which runs
after the AF_PACKET taps. Installed once every worker is listening, removed on stop.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

from rusty_rail.engines import hostfilter
from rusty_rail.engines.neighbours import NeighbourResolver, device_info
from rusty_rail.engines.ring import (
    BLOCK_DESC,
    BLOCK_STATUS_OFF,
    TP_STATUS_AVAILABLE,
    TP_STATUS_KERNEL,
    TP_STATUS_VLAN_VALID,
    TP_STATUS_WRONG_FORMAT,
    TPACKET3_HDR,
    TPACKET3_HDRLEN,
    TX_FIELDS,
    TX_FIELDS_OFF,
    TX_STATUS,
    TX_STATUS_OFF,
    PacketRing,
    inner_flow_fanout_program,
)

# Verdict.action values (rusty_rail.core.verdict.Action); duck-typed so any decide() works.
_FORWARD = 0
_DROP = 2
_NO_NEIGHBOUR = 16
_TX_FAILED = 18
_SEND_REQUEST = 1

Decide = Callable[[bytes, float], Any]


class BalancerLike(Protocol):
    def decide(self, frame: bytes, now: float) -> Any: ...


class Stop(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class EngineStats:
    """What the engine itself counts (the balancer keeps the verdict counters)."""

    rx_packets: int = 0
    rx_blocks: int = 0
    rx_kernel_drops: int = 0
    """Frames the kernel could not put in the RX ring (ring full: we were too slow)."""
    tx_ring: int = 0
    tx_spilled: int = 0
    """Forwards sent with a plain send() because the next TX slot was still held by an skb."""
    tx_failed: int = 0
    rx_vlan_skipped: int = 0
    neighbour_refreshes: int = 0
    workers: int = 1
    balancer: dict[str, int] = field(default_factory=dict)

    def add(self, other: EngineStats) -> None:
        for name in ("rx_packets", "rx_blocks", "rx_kernel_drops", "tx_ring", "tx_spilled", "tx_failed",
                     "rx_vlan_skipped", "neighbour_refreshes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, value in other.balancer.items():
            if isinstance(value, int):
                self.balancer[key] = self.balancer.get(key, 0) + value


def _balancer_counters(balancer: object) -> dict[str, int]:
    counters = getattr(balancer, "counters", None)
    if callable(counters):
        counters = counters()
    return dict(counters) if counters else {}


def _die_with_parent() -> None:
    """Forked workers get SIGTERM if the supervisor dies (PR_SET_PDEATHSIG), so none is left behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Worker:
    """One socket + rings + balancer. `loop()` is the hot path."""

    def __init__(
        self,
        device: str,
        balancer: BalancerLike | Decide,
        *,
        ring_options: dict[str, Any] | None = None,
        neighbour_interval: float = 1.0,
        poll_ms: int = 100,
        control: Connection | None = None,
    ) -> None:
        self.device = device
        self.control = control
        """A pipe to the supervisor (forked workers): apply / counters / explain requests."""
        self._dataplane: Any = None
        self.ifindex, self.mac, self.address = device_info(device)
        self.balancer = balancer
        self.decide: Decide = balancer.decide if hasattr(balancer, "decide") else balancer  # type: ignore[union-attr]
        self.ring = PacketRing(self.ifindex, **(ring_options or {}))
        # A second, ring-less socket for forwards that find the TX ring slot still busy (protocol 0:
        # it receives nothing). A socket with a TX ring cannot do plain sends.
        self.spill = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.spill.bind((device, 0))
        self.resolver = NeighbourResolver(device) if hasattr(balancer, "set_neighbour") else None
        self.neighbour_interval = neighbour_interval
        self.poll_ms = poll_ms
        self.wanted: set[int] = set()
        """Backends a NO_NEIGHBOUR drop named; resolved with the balancer's own backend set."""
        self.stats = EngineStats()

    def backends(self) -> Iterable[int]:
        own = getattr(self.balancer, "backends", ())
        return set(own) | self.wanted

    def refresh_neighbours(self) -> None:
        if self.resolver is None:
            return
        self.resolver.refresh(self.backends(), self.balancer)  # type: ignore[arg-type]
        self.stats.neighbour_refreshes += 1

    def _count_tx_failed(self) -> None:
        self.stats.tx_failed += 1
        count_drop = getattr(self.balancer, "count_drop", None)
        if count_drop is not None:
            count_drop(_TX_FAILED)

    def _spill(self, frame: bytes) -> None:
        try:
            self.spill.send(frame, socket.MSG_DONTWAIT)
            self.stats.tx_spilled += 1
        except OSError:
            self._count_tx_failed()

    def loop(self, stop: Callable[[], bool]) -> EngineStats:
        """Receive, decide, forward until `stop()` is true (checked at least every `poll_ms`)."""
        ring = self.ring
        m = ring.map
        decide = self.decide
        hdr = TPACKET3_HDR.unpack_from
        block_desc = BLOCK_DESC.unpack_from
        u32_into = TX_STATUS.pack_into
        status_of = TX_STATUS.unpack_from
        tx_fields = TX_FIELDS.pack_into
        tx_base = ring.tx_base
        tx_frame_size = ring.tx_frame_size
        tx_frames = ring.tx_frames
        tx_max = ring.tx_max_len
        kick_at = ring.tx_kick_at
        block_size = ring.rx_block_size
        blocks = ring.rx_blocks
        stats = self.stats
        monotonic = time.monotonic
        poller = select.poll()
        poller.register(ring.sock, select.POLLIN | select.POLLERR)
        control = self.control
        if control is not None:
            poller.register(control.fileno(), select.POLLIN)  # a control request wakes an idle worker
        next_control = 0.0

        self.refresh_neighbours()
        now = monotonic()
        next_house = now + self.neighbour_interval
        rx_index = ring.rx_index
        while not stop():
            base = rx_index * block_size
            status, num, first = block_desc(m, base)
            if not status & 1:  # TP_STATUS_USER: nothing to read; flush, housekeeping, sleep in poll
                ring.tx_kick()
                now = monotonic()
                if now >= next_house:
                    next_house = now + self.neighbour_interval
                    self._housekeeping()
                if control is not None and control.poll():
                    self.serve_control()
                poller.poll(self.poll_ms)
                continue

            # ---- hot path: one RX block; no per-packet allocation beyond the frame bytes decide() needs
            now = monotonic()
            off = base + first
            tx_index = ring.tx_index
            pending = ring.tx_pending
            queued = 0
            for _ in range(num):
                nxt, snap, pstatus, mac = hdr(m, off)
                if pstatus & TP_STATUS_VLAN_VALID:  # tag stripped into metadata: not ours (WIRE.md 1)
                    stats.rx_vlan_skipped += 1
                    off += nxt
                    continue
                start = off + mac
                v = decide(m[start : start + snap], now)
                off += nxt
                if v is None:
                    continue
                action = v.action
                if action == _FORWARD:
                    frame = v.frame
                    n = len(frame)
                    slot = tx_base + tx_index * tx_frame_size
                    st = status_of(m, slot + TX_STATUS_OFF)[0]
                    if n <= tx_max and (st == TP_STATUS_AVAILABLE or st == TP_STATUS_WRONG_FORMAT):
                        data = slot + TPACKET3_HDRLEN
                        m[data : data + n] = frame
                        tx_fields(m, slot + TX_FIELDS_OFF, n, n, _SEND_REQUEST)
                        tx_index += 1
                        if tx_index == tx_frames:
                            tx_index = 0
                        pending += 1
                        queued += 1
                        if pending >= kick_at:  # never more than half the ring un-kicked (ring.py)
                            ring.tx_pending = pending
                            ring.tx_kick()
                            pending = 0
                    else:
                        self._spill(frame)
                elif action == _DROP and v.reason == _NO_NEIGHBOUR and v.backend is not None:
                    if v.backend not in self.wanted:
                        self.wanted.add(v.backend)
                        next_house = min(next_house, now + 0.05)  # resolve soon, not per packet
            # ---- end of hot path
            stats.rx_packets += num
            stats.rx_blocks += 1
            stats.tx_ring += queued
            ring.tx_index = tx_index
            ring.tx_pending = pending
            ring.tx_kick()  # one kick per block
            u32_into(m, base + BLOCK_STATUS_OFF, TP_STATUS_KERNEL)  # block back to the kernel
            rx_index += 1
            if rx_index == blocks:
                rx_index = 0
            ring.rx_index = rx_index
            if now >= next_house:
                next_house = now + self.neighbour_interval
                self._housekeeping()
            if control is not None and now >= next_control:  # busy: look at most every 50 ms
                next_control = now + 0.05
                if control.poll():
                    self.serve_control()
        ring.tx_kick()
        self._housekeeping()
        stats.balancer = _balancer_counters(self.balancer)
        return stats

    def serve_control(self) -> None:
        """Answer the supervisor's requests: ("apply", DataplaneState), ("counters",), ("explain", key)."""
        from rusty_rail.control.balancer_dataplane import BalancerDataplane

        assert self.control is not None
        if self._dataplane is None:
            self._dataplane = BalancerDataplane(self.balancer)  # type: ignore[arg-type]
        while self.control.poll():
            request = self.control.recv()
            try:
                if request[0] == "apply":
                    self._dataplane.apply(request[1])
                    reply: Any = None
                elif request[0] == "counters":
                    reply = self._dataplane.counters()
                elif request[0] == "explain":
                    reply = self._dataplane.explain(request[1])
                else:
                    raise ValueError(f"unknown request {request[0]!r}")
            except Exception as exc:  # the supervisor reports it; the worker keeps forwarding
                self.control.send(("error", f"{type(exc).__name__}: {exc}"))
            else:
                self.control.send(("ok", reply))

    def _housekeeping(self) -> None:
        self.refresh_neighbours()
        self.stats.rx_kernel_drops += self.ring.statistics()[1]

    def close(self) -> None:
        if self.resolver is not None:
            self.resolver.close()
        self.spill.close()
        self.ring.close()


class AfPacketEngine:
    """Runs the balancer on `device` with `workers` processes (1: in this process).

    `balancer` is anything with `decide(frame, now)` (and optionally `set_neighbour`, `backends`,
    `counters`), or a bare decide function. With workers > 1, `factory()` is called in each worker to
    build its own balancer; without a factory each forked worker uses its copy of `balancer`.
    """

    def __init__(
        self,
        device: str,
        balancer: BalancerLike | Decide | None = None,
        workers: int = 1,
        *,
        factory: Callable[[], BalancerLike | Decide] | None = None,
        host_filter: bool = True,
        neighbour_interval: float = 1.0,
        ring_options: dict[str, Any] | None = None,
        fanout_group: int | None = None,
        poll_ms: int = 100,
    ) -> None:
        if balancer is None and factory is None:
            raise ValueError("give a balancer or a factory")
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.device = device
        self.balancer = balancer
        self.factory = factory
        self.workers = workers
        self.host_filter = host_filter
        self.neighbour_interval = neighbour_interval
        self.ring_options = ring_options
        self.fanout_group = fanout_group if fanout_group is not None else os.getpid() & 0xFFFF
        self.poll_ms = poll_ms
        self.stats = EngineStats(workers=workers)
        self.ready = threading.Event()
        """Set once every worker listens and the host filter is in place."""
        self._state: Any = None
        self._controls: list[Connection] = []
        self._control_lock = threading.Lock()
        self._local: Any = None

    # -- one worker, in this process ----------------------------------------------------------------

    def _make_worker(self, fanout: bool, control: Connection | None = None) -> Worker:
        balancer = self.factory() if self.factory is not None else self.balancer
        assert balancer is not None
        worker = Worker(
            self.device,
            balancer,
            ring_options=self.ring_options,
            neighbour_interval=self.neighbour_interval,
            poll_ms=self.poll_ms,
            control=control,
        )
        if fanout:
            try:
                worker.ring.join_fanout(self.fanout_group, inner_flow_fanout_program())
            except BaseException:
                worker.close()
                raise
        return worker

    def run(self, stop: Stop) -> EngineStats:
        """Serve until `stop.is_set()`. Returns the summed statistics (also kept in `self.stats`)."""
        device_info(self.device)  # a clear error before anything is set up
        if self.workers == 1:
            return self._run_single(stop)
        return self._run_many(stop)

    def _run_single(self, stop: Stop) -> EngineStats:
        worker = self._make_worker(fanout=False)
        try:
            if self.host_filter:
                hostfilter.install(self.device)
            self.ready.set()
            stats = worker.loop(stop.is_set)
        finally:
            if self.host_filter:
                hostfilter.remove(self.device)
            worker.close()
        self.stats = EngineStats(workers=1)
        self.stats.add(stats)
        return self.stats

    # -- several workers, forked --------------------------------------------------------------------

    def _child(self, index: int, child_stop: Any, results: Any, control: Connection) -> None:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
        terminated = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: terminated.set())
        try:
            worker = self._make_worker(fanout=True, control=control)
        except BaseException as e:  # report, don't hang the supervisor
            results.put(("error", index, f"{type(e).__name__}: {e}"))
            return
        try:
            results.put(("ready", index, None))
            stats = worker.loop(lambda: terminated.is_set() or child_stop.is_set())
            results.put(("stats", index, stats))
        finally:
            worker.close()

    def _run_many(self, stop: Stop) -> EngineStats:
        ctx = multiprocessing.get_context("fork")
        child_stop = ctx.Event()
        results = ctx.Queue()
        pipes = [ctx.Pipe(duplex=True) for _ in range(self.workers)]
        procs = [ctx.Process(target=self._child, args=(i, child_stop, results, pipes[i][1]), name=f"rusty-rail-w{i}")
                 for i in range(self.workers)]
        total = EngineStats(workers=self.workers)
        installed = False
        try:
            for p in procs:
                p.start()
            ready = 0
            deadline = time.monotonic() + 30
            while ready < self.workers:
                try:
                    kind, index, detail = results.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    raise RuntimeError("workers did not start in time") from None
                if kind == "error":
                    raise RuntimeError(f"worker {index} failed to start: {detail}")
                ready += 1
            with self._control_lock:
                self._controls = [parent for parent, _ in pipes]
            if self._state is not None:  # what the control plane asked for before the workers existed
                self._ask_all(("apply", self._state))
            if self.host_filter:
                hostfilter.install(self.device)
                installed = True
            self.ready.set()
            while not stop.is_set():
                if any(not p.is_alive() for p in procs):
                    raise RuntimeError("a worker died; stopping the others")
                _wait(stop, 0.2)
        finally:
            with self._control_lock:
                self._controls = []
            child_stop.set()
            if installed:
                hostfilter.remove(self.device)
            deadline = time.monotonic() + 5
            collected = 0
            while collected < sum(1 for p in procs if p.pid is not None) and time.monotonic() < deadline:
                try:
                    kind, index, detail = results.get(timeout=0.2)
                except queue.Empty:
                    if not any(p.is_alive() for p in procs):
                        break
                    continue
                if kind == "stats":
                    total.add(detail)
                    collected += 1
            for p in procs:
                if p.pid is None:
                    continue
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join()
        self.stats = total
        return total

    # -- the Dataplane protocol (rusty_rail.control.model) -------------------------------------------
    # One worker: its balancer lives in this process and is changed directly. Several: every worker
    # gets each request over its pipe, and the answers are merged.

    def _local_dataplane(self) -> Any:
        from rusty_rail.control.balancer_dataplane import BalancerDataplane

        if self._local is None:
            if self.workers != 1 or self.balancer is None or callable(self.balancer) and not hasattr(self.balancer, "decide"):
                return None
            self._local = BalancerDataplane(self.balancer)  # type: ignore[arg-type]
        return self._local

    def _ask_all(self, request: tuple, timeout: float = 5.0) -> list[Any]:
        with self._control_lock:
            controls = list(self._controls)
            for conn in controls:
                conn.send(request)
            replies = []
            for index, conn in enumerate(controls):
                if not conn.poll(timeout):
                    raise TimeoutError(f"worker {index} did not answer {request[0]!r} within {timeout}s")
                status, value = conn.recv()
                if status != "ok":
                    raise RuntimeError(f"worker {index}: {value}")
                replies.append(value)
            return replies

    def apply(self, state: Any) -> None:
        self._state = state
        local = self._local_dataplane()
        if local is not None:
            local.apply(state)
        elif self._controls:
            self._ask_all(("apply", state))

    def counters(self) -> dict[str, object]:
        local = self._local_dataplane()
        if local is not None:
            out = local.counters()
        else:
            out = merge_counters(self._ask_all(("counters",)) if self._controls else [])
        out["ready"] = self.ready.is_set()
        return out

    def explain(self, key: Any) -> Any:
        local = self._local_dataplane()
        if local is not None:
            return local.explain(key)
        answers = self._ask_all(("explain", key)) if self._controls else []
        # Only the worker that owns the flow has its connection entry; the table slot is the same in all.
        for answer in answers:
            if answer[1] == "connection entry":
                return answer
        return answers[0] if answers else (None, "no workers running")

    # -- signals ------------------------------------------------------------------------------------

    def serve_forever(self) -> EngineStats:
        """run() until SIGTERM or SIGINT (must be called from the main thread)."""
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self.run(stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _wait(stop: Stop, timeout: float) -> None:
    wait = getattr(stop, "wait", None)
    if wait is not None:
        wait(timeout)
    else:
        time.sleep(timeout)


def merge_counters(parts: list[dict[str, Any]]) -> dict[str, object]:
    """Workers' counters added up; each worker builds the same tables, so rebuilds are not added."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key == "table_rebuilds":
                out[key] = max(out.get(key, 0), value)
            elif key == "backends":
                merged = out.setdefault(key, {})
                for k, (packets, nbytes) in value.items():
                    p0, b0 = merged.get(k, (0, 0))
                    merged[k] = (p0 + packets, b0 + nbytes)
            elif key == "flows":
                merged = out.setdefault(key, {})
                for k, n in value.items():
                    merged[k] = merged.get(k, 0) + n
            elif isinstance(value, int):
                out[key] = out.get(key, 0) + value
    return out
