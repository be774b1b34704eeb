"""Per-service options: what a service asks of the decision besides its table (docs/WIRE.md section 11).

One frozen `ServiceOptions` per service, its defaults written here and nowhere else; the configuration
sets them per service, StateBuilder carries them in `Service.options`, the core's decision and the XDP
program (through the planner's map writes) read them.

- `hash`: which bytes of the flow key the Maglev slot is chosen by (`hashed_key`). The connection table
  is keyed by the whole flow key whatever the hash, so `flows`, `explain` and the service match see
  flows as before; only a new flow's slot changes.
- `connection_table`: False: no connection entry is ever read or written for the service's flows (every
  packet goes by the slot), so a flood of new flows to it cannot touch the table (Katran's F_LRU_BYPASS).
- `answer_ping`: ICMP echo requests (ICMPv6 echo requests) to the service are answered by the balancer
  itself (as Katran does), so a VIP's reachability can be watched without a backend.
- `quic` and `server_ids`: QUIC short-header packets go to the backend whose server ID their destination
  connection ID carries (`quic_server_id`); long headers and unknown IDs go by the slot.

Also here: the token bucket that bounds the ICMP "too big" answers (`TokenBucket`, `IcmpLimit`), whose
arithmetic the XDP program repeats in integers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from rusty_rail.core.constants import ICMP_TOO_BIG_BURST, ICMP_TOO_BIG_RATE

__all__ = ["HashFields", "IcmpLimit", "QUIC_CID_AT", "ServiceOptions", "TokenBucket", "hashed_key",
           "quic_server_id"]


class HashFields(IntEnum):
    """What a flow's Maglev slot is hashed on (docs/WIRE.md section 11). The values are the XDP program's
    (bpf/rr_structs.h RR_OPT_HASH_*)."""

    FIVE_TUPLE = 0
    """src | dst | sport | dport | proto: every connection on its own (the default)."""
    SOURCE_IP = 1
    """src | dst, ports and protocol zeroed: every connection of a client to the service on one backend
    (VPP's src_ip_sticky hashes the same address pair; GLB hashes the source address)."""
    SOURCE_IP_PORT = 2
    """src | dst | sport | proto, the destination port zeroed: a client's source port reaches one backend
    on every port of a multi-port service."""

    @property
    def text(self) -> str:
        return _HASH_TEXT[self]

    @classmethod
    def from_text(cls, text: str) -> HashFields:
        for fields, name in _HASH_TEXT.items():
            if name == text:
                return fields
        raise ValueError(f"{text!r} is not one of {', '.join(_HASH_TEXT.values())}")


_HASH_TEXT = {HashFields.FIVE_TUPLE: "5-tuple", HashFields.SOURCE_IP: "source-ip",
              HashFields.SOURCE_IP_PORT: "source-ip-port"}
_ZERO8 = bytes(8)
_ZERO2 = bytes(2)


def hashed_key(key: bytes, fields: HashFields) -> bytes:
    """The bytes the flow hash reads for a flow key (16 or 40 bytes, core/flow.py) of a service hashing on
    `fields`: the key itself, or the key with the fields left out zeroed (the same length, so the family
    still shows and the XDP program hashes the same number of blocks)."""
    if fields == HashFields.FIVE_TUPLE:
        return key
    ports = len(key) - 8  # sport | dport | proto | 0 0 0: the last 8 bytes of a key of either family
    if fields == HashFields.SOURCE_IP:
        return key[:ports] + _ZERO8
    return key[:ports + 2] + _ZERO2 + key[ports + 4:]


QUIC_CID_AT = 1
"""A QUIC short header's destination connection ID starts at the UDP payload's second byte (RFC 9000
17.3.1: one byte of flags first)."""
QUIC_SERVER_ID_LEN = 2
"""Bytes of server ID after the CID's first octet (QUIC-LB plaintext algorithm, server_id_len = 2)."""
_QUIC_LONG_HEADER = 0x80
_QUIC_ROTATION_MASK = 0xE0  # the first CID octet's config rotation bits (QUIC-LB section 3)


def quic_server_id(payload: bytes) -> int | None:
    """The server ID a QUIC packet's destination connection ID carries, or None (docs/WIRE.md 11.4).

    `payload` is the UDP payload (it may hold more than the datagram: only the first 4 bytes are read).
    A short header (RFC 9000 17.3: the header form bit clear) whose CID's first octet has config rotation
    bits 0 (draft-ietf-quic-load-balancers section 3: our one configuration) carries the plaintext
    server ID (section 5.2) in the CID's next QUIC_SERVER_ID_LEN bytes, big-endian. Long headers (the
    handshake, whose CID the client chose) and other rotation bits: None."""
    if len(payload) < QUIC_CID_AT + 1 + QUIC_SERVER_ID_LEN or payload[0] & _QUIC_LONG_HEADER:
        return None
    if payload[QUIC_CID_AT] & _QUIC_ROTATION_MASK:
        return None
    return (payload[QUIC_CID_AT + 1] << 8) | payload[QUIC_CID_AT + 2]


@dataclass(frozen=True)
class ServiceOptions:
    """A service's options; every default is here (docs/WIRE.md section 11)."""

    hash: HashFields = HashFields.FIVE_TUPLE
    connection_table: bool = True
    answer_ping: bool = True
    quic: bool = False
    server_ids: tuple[tuple[int, int], ...] = field(default=())
    """(backend address as int, server ID 0..65535), in backend order; only with `quic`. A backend's ID
    counts while the backend is listed in the service's table (drained included: its connections stay)."""

    @property
    def plain(self) -> bool:
        """True when a TCP or UDP flow's decision is the default one: 5-tuple hash, connection table,
        no QUIC. (answer_ping changes only ICMP echo requests.)"""
        return self.hash == HashFields.FIVE_TUPLE and self.connection_table and not self.quic

    def server_backends(self) -> dict[int, int]:
        """server ID -> backend (as int)."""
        return {sid: backend for backend, sid in self.server_ids}


ENVIRONMENT_OPTIONS = ServiceOptions(answer_ping=False)
"""The environment form's catch-all: today's behaviour exactly, an echo request to any VIP going to a
backend like any other packet (its answer then also says that backend is reachable)."""


@dataclass(frozen=True)
class IcmpLimit:
    """How many ICMP "too big" answers each CPU (XDP) or worker (AF_PACKET) may send: `per_second` on
    average, `burst` at once (Linux's icmp_msgs_per_sec and icmp_msgs_burst defaults)."""

    per_second: int = ICMP_TOO_BIG_RATE
    burst: int = ICMP_TOO_BIG_BURST

    def __post_init__(self) -> None:
        if not 1 <= self.per_second <= 1_000_000_000 or self.burst < 0:
            raise ValueError(f"an ICMP limit of {self.per_second}/s, burst {self.burst}, is not usable")

    @property
    def period_ns(self) -> int:
        """Nanoseconds that earn one answer."""
        return 1_000_000_000 // self.per_second

    @property
    def capacity_ns(self) -> int:
        """The bucket's size in nanoseconds of credit: `burst` answers."""
        return self.period_ns * self.burst


class TokenBucket:
    """IcmpLimit as credit in nanoseconds: time adds credit up to capacity, an answer costs one period.
    The XDP program keeps the same two integers per CPU (rr_icmp_bucket) and does the same arithmetic;
    a bucket starts full (the program's starts empty at time 0, so full at its first packet)."""

    def __init__(self, limit: IcmpLimit = IcmpLimit()) -> None:
        self.limit = limit
        self.credit_ns = limit.capacity_ns
        self.last_ns: int | None = None

    def take(self, now: float) -> bool:
        """One answer at `now` (seconds, any monotonic origin): True when the bucket allows it."""
        now_ns = int(now * 1_000_000_000)
        if self.last_ns is not None and now_ns > self.last_ns:
            self.credit_ns = min(self.credit_ns + now_ns - self.last_ns, self.limit.capacity_ns)
        self.last_ns = now_ns if self.last_ns is None else max(self.last_ns, now_ns)
        if self.credit_ns >= self.limit.period_ns:
            self.credit_ns -= self.limit.period_ns
            return True
        return False
