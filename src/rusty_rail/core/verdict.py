"""What the balancer decides about a frame: forward it, pass it to the host, or drop it (and why)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple


class DropReason(IntEnum):
    """docs/WIRE.md section 9; the numbers index the XDP program's counters too (19..22, 26 and 28..30 are
    its other counters there, bpf/rr_structs.h). TX_REFUSED is counted by the engines from the device, never
    by the decision or the program."""

    OUTER_BAD_IHL = 1
    OUTER_OPTIONS = 2
    OUTER_BAD_LENGTH = 3
    OUTER_BAD_CHECKSUM = 4
    OUTER_FRAGMENT = 5
    GRE_TRUNCATED = 6
    GRE_VERSION = 7
    GRE_RESERVED = 8
    GRE_CHECKSUM = 9
    GRE_PROTOCOL = 10
    INNER_TRUNCATED = 11
    INNER_VERSION = 12
    INNER_BAD_IHL = 13
    INNER_BAD_LENGTH = 14
    NO_BACKEND = 15
    NO_NEIGHBOUR = 16
    NO_SERVICE = 17
    TX_FAILED = 18
    # 19-22 and 26 index the XDP program's other counters (bpf/rr_structs.h).
    TX_REFUSED = 23
    """Sent out of the device, which refused to transmit it (its tx_dropped; engines/device.py)."""
    INNER_EXT_HEADERS = 24
    OUTPUT_TOO_BIG = 25
    """Too big for the MTU toward its backend, and not answered: an IPv4 packet without DF, an ICMP error,
    a later fragment (docs/WIRE.md section 8b)."""
    # 26 and 28-30 index the XDP program's other counters (bpf/rr_structs.h).
    ICMP_RATE_LIMITED = 27
    """Too big and to be answered, but this CPU's (worker's) ICMP token bucket was empty."""


class Action(IntEnum):
    FORWARD = 0
    PASS = 1
    DROP = 2
    REPLY = 3
    """Answered by the balancer itself: an ICMP message sent back out of the device toward the frame's
    sender (docs/WIRE.md section 11), not to a backend."""


class Forward(NamedTuple):
    """Send `frame` out of the device the input came in on.

    A NamedTuple, not a frozen dataclass like the others: one is built per forwarded packet, and a
    frozen dataclass's __init__ costs half a microsecond more on the AF_PACKET hot path.
    """

    frame: bytes
    backend: int
    action = Action.FORWARD  # not annotated: a class attribute, not a field


class Reply(NamedTuple):
    """Send `frame`, the balancer's own answer (an echo reply, a "too big"), out of the device toward the
    router the input came from. A NamedTuple for the same reason as Forward."""

    frame: bytes
    action = Action.REPLY  # not annotated: a class attribute, not a field


@dataclass(frozen=True, slots=True)
class Pass:
    """Not ours: the host's stack has the frame and keeps it."""

    action = Action.PASS


@dataclass(frozen=True, slots=True)
class Drop:
    reason: DropReason
    backend: int | None = None
    """Set for NO_NEIGHBOUR, so the engine knows whose next hop to resolve."""
    action = Action.DROP


Verdict = Forward | Reply | Pass | Drop

PASS = Pass()
