"""The `Engine` protocol: what the control plane and the daemon need of a data plane, and nothing more.

    engine = create_engine(kind, options)        # rusty_rail.engines
    engine.apply(state)                          # before start(): served from the first packet
    engine.start()                               # rings open / program loaded and attached
    report = engine.serve(stop)                  # until stop is set; then detached (or handed over:
                                                 # engine.hand_over(pin_root) before the stop)

Every engine makes the same decisions byte for byte (docs/WIRE.md); they differ only in where the
decision runs: a Python process reading TPACKET_V3 rings (AF_PACKET) or a BPF program in the kernel (XDP).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from rusty_rail.core.address import Address
from rusty_rail.core.constants import DEFAULT_CONN_CAPACITY, DEFAULT_PIN_ROOT
from rusty_rail.core.flow import FlowKey
from rusty_rail.core.service import ServiceKey
from rusty_rail.dataplane.state import DataplaneState

DEFAULT_MAX_SERVICES = 64
"""Services the XDP program's maps are sized for (each adds a Maglev table to rr_maglev)."""


MAX_DEFAULT_WORKERS = 8
"""The most AF_PACKET workers a machine gets without asking: each keeps its own connection table (up to
connection_capacity entries, a few hundred MB in Python when full) and is sent every table change;
beyond a few cores the XDP engine is the one to run."""


def default_workers(cpus: int | None = None) -> int:
    """AF_PACKET workers when none are asked for: one less than the CPUs this process may run on
    (`cpus`, default its affinity), at least 1, at most MAX_DEFAULT_WORKERS.

    One CPU is left to the kernel's half of every frame, which no worker can take over: the copy into
    the RX ring in the receiving softirq and the transmit behind each kick. Measured on 2 CPUs
    (bench/engine_rates.py, random flows, medians of 3 rounds): one worker on one CPU, the sender on
    the other, delivered 100% at 200 kpps and 307 kpps at the sender's maximum (401 offered), at 2.98
    us of CPU per packet; two workers on both CPUs, 100% at 200 kpps and 305 kpps at the maximum (374
    offered: the second worker's CPU is taken from the receive side), at 3.25 us per packet. On a busier
    machine: 291 against 241 kpps. More workers add capacity for many flows, not for one: the fanout
    keeps a flow on one worker (cbpf.py); and the control plane reaches each worker over its pipe."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0))
    return max(1, min(cpus - 1, MAX_DEFAULT_WORKERS))


class EngineKind(str, Enum):
    AUTO = "auto"
    """XDP where it can deliver, else AF_PACKET; the start-up log line says which and why."""
    AFPACKET = "afpacket"
    XDP = "xdp"


class XdpMode(str, Enum):
    AUTO = "auto"
    """Native where the device can deliver XDP_TX, generic (skb) mode where it cannot."""
    NATIVE = "native"
    GENERIC = "generic"


class EngineError(RuntimeError):
    """An engine cannot run here (no device, no privileges, the program does not load); the message
    is meant for the operator as is."""


@dataclass(frozen=True)
class EngineOptions:
    """Everything an engine is started with besides the services (those come with apply())."""

    device: str
    """The interface GRE arrives on and leaves by."""
    workers: int = field(default_factory=default_workers)
    """AF_PACKET worker processes (default_workers(): one less than the CPUs); every packet of a flow
    goes to the same one."""
    connection_capacity: int = DEFAULT_CONN_CAPACITY
    """Connection-table entries (per worker on AF_PACKET), least recently used evicted beyond."""
    pin_root: str = DEFAULT_PIN_ROOT
    """bpffs directory below which a hitless restart pins the XDP engine's maps."""
    xdp_mode: XdpMode = XdpMode.AUTO
    xdp_dispatcher: bool = False
    """Attach the XDP program through libxdp's dispatcher always (True), or only when another program
    than ours runs on the device (False): engines/xdp/hook.py."""
    max_services: int = DEFAULT_MAX_SERVICES
    """Services the XDP maps are sized for."""


@dataclass(frozen=True)
class Explanation:
    backend: Address | None
    reason: str
    """'connection entry', 'table slot N', 'no service matches', 'no backends', ..."""


@dataclass(frozen=True)
class Counters:
    """An engine's figures, summed over its workers or CPUs."""

    forwarded: int = 0
    """Frames sent out of the device, less those it refused to transmit (drops tx_refused, tx_failed)."""
    passed: int = 0
    drops: Mapping[str, int] = field(default_factory=dict)
    """Drop reason (DropReason name, lower case) -> packets."""
    connections: int = 0
    connection_evictions: int = 0
    backends: Mapping[tuple[ServiceKey, Address], tuple[int, int]] = field(default_factory=dict)
    """(service, backend) -> (packets, inner bytes) forwarded, for every backend listed now."""
    flows: Mapping[tuple[ServiceKey, Address], int] | None = None
    """(service, backend) -> connection entries of that service's flows naming the backend (an entry's
    key names its service: ServiceMatcher.tally); None when the table is too large to walk cheaply."""
    ready: bool = False
    """True once the engine forwards (rings open, program attached)."""
    engine: Mapping[str, int] = field(default_factory=dict)
    """Figures of this engine only (conn_hit, rx_kernel_drops, ...)."""
    forwarded_ipv6: int = 0
    """Of `forwarded`, the frames whose inner packet is IPv6 (docs/WIRE.md section 9): figures per family."""
    connections_ipv6: int = 0
    """Of `connections`, the IPv6 flows' entries."""
    options: Mapping[str, int] = field(default_factory=dict)
    """The per-service options' figures (docs/WIRE.md section 11): icmp_echo_replies and icmp_too_big
    (answers the engine sent back toward the router, not in `forwarded`), quic_routed (of `forwarded`,
    those whose backend came from a QUIC server ID)."""


@dataclass(frozen=True)
class EngineReport:
    """How a serve() ended."""

    engine: EngineKind
    handed_over: bool
    """True when the program was left attached for a successor (hitless restart)."""
    counters: Counters


class Engine(Protocol):
    kind: EngineKind

    def apply(self, state: DataplaneState) -> None:
        """Serve `state` (before start(): from the first packet). Established flows of backends still
        listed in their service keep them. Raises ValueError if the engine cannot hold the state."""

    def start(self) -> None:
        """Take the device: open rings / load and attach the program. Raises EngineError."""

    @property
    def ready(self) -> bool:
        """True once frames are being forwarded."""

    def counters(self, *, walk: bool = True) -> Counters:
        """Every figure. walk=False: without walking the connection table, whose cost grows with it:
        `flows` is None and, where only a walk counts them (XDP), `connections` and
        `connection_evictions` are 0. For callers that need only the packet figures (the self-check)."""

    def explain(self, key: FlowKey) -> Explanation:
        """Where a flow would go now and why, without changing any state."""

    def serve(self, stop: threading.Event) -> EngineReport:
        """Run until `stop` is set (from the calling thread), then let go of the device."""

    def hand_over(self, pin_root: str) -> bool:
        """Prepare a hitless restart: pin what a successor needs below `pin_root` (a bpffs directory,
        as this process reaches the successor's view of it) and make the coming stop leave the device
        served. True when done; False when the engine has nothing to leave running (its stop stays a
        plain one). Raises EngineError with the reason when it cannot: then nothing changed, the engine
        keeps serving and a stop is a plain one."""

    def cancel_handover(self) -> None:
        """Undo a hand_over() (the successor never heard of it): pins removed, serving on as before."""

    def close(self) -> None:
        """Let go of everything start() took, when serve() will not run (idempotent)."""
