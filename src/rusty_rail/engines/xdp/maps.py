"""ctypes mirrors of bpf/rr_structs.h, the map and program names of bpf/rr_maps.h, and the constants.

tests/test_xdp_layout.py compiles rr_structs.h with the host compiler and checks every size and field
offset here, and every constant, against it. Fields typed __be32/__be16 in C hold network-order bytes:
they are mirrored as byte arrays, so nothing depends on the host's byte order.
"""

from __future__ import annotations

import ctypes

from rusty_rail.core import constants
from rusty_rail.core.address import AddressLike, address_int, is_ipv6
from rusty_rail.core.verdict import DropReason
from rusty_rail.dataplane.engine import DEFAULT_MAX_SERVICES  # noqa: F401 (RR_DEFAULT_MAX_SERVICES)

MAP_CONFIG = "rr_config"
MAP_BACKENDS = "rr_backends"
MAP_MAGLEV = "rr_maglev"
MAP_CONNS = "rr_conns"
MAP_CONNS6 = "rr_conns6"
MAP_STATS = "rr_stats"
MAP_SERVICES = "rr_services"
MAP_SERVICES6 = "rr_services6"
MAP_MEMBERS = "rr_members"
MAP_BACKEND_STATS = "rr_backend_stats"
MAP_ICMP_BUCKET = "rr_icmp_bucket"
MAP_QUIC = "rr_quic"
MAP_FLOW_CACHE = "rr_flow_cache"
MAP_CACHE_GEN = "rr_cache_gen"
MAPS = (MAP_CONFIG, MAP_BACKENDS, MAP_MAGLEV, MAP_CONNS, MAP_CONNS6, MAP_STATS, MAP_SERVICES, MAP_SERVICES6,
        MAP_MEMBERS, MAP_BACKEND_STATS, MAP_ICMP_BUCKET, MAP_QUIC, MAP_FLOW_CACHE, MAP_CACHE_GEN)
CONN_MAPS = (MAP_CONNS, MAP_CONNS6)
"""The connection tables: IPv4 keys, IPv6 keys (docs/WIRE.md section 7)."""
PERCPU_MAPS = (MAP_STATS, MAP_BACKEND_STATS, MAP_ICMP_BUCKET, MAP_FLOW_CACHE)
"""Per-CPU arrays: a value is read and written for every possible CPU."""
PROGRAM = "rr_balance"
PASS_PROGRAM = "rr_pass"
"""bpf/xdp_pass.c's program (attach_pass)."""

MAX_BACKENDS = 4096
"""rr_backends entries: distinct backend addresses over every service."""
DEFAULT_TABLE_SIZE = constants.DEFAULT_TABLE_SIZE
DEFAULT_CONNS = constants.DEFAULT_CONN_CAPACITY
MEMBER_WORDS = MAX_BACKENDS // 64
MAX_QUIC_IDS = 4096
"""rr_quic entries: (service, QUIC server ID) pairs over every service with quic = true."""

# rr_config.cache_services (rr_structs.h RR_CACHE_*): families whose flows look their connection entry up
# before their service.
CACHE_SERVICES4 = 1
CACHE_SERVICES6 = 2
# rr_service.flags / rr_config.catch_all_flags (rr_structs.h RR_OPT_*): a service's options.
OPT_HASH_MASK = 0x3  # core/options.py HashFields' values
OPT_NO_CONNS = 0x4
OPT_ANSWER_PING = 0x8
OPT_QUIC = 0x10

TIMEOUT_TCP, TIMEOUT_UDP, TIMEOUT_OTHER = 0, 1, 2

EXT_HEADERS = 4
"""RR_EXT_HEADERS: inner IPv6 extension headers walked (core/ipv6.py EXTENSION_HEADER_LIMIT)."""

# rr_stats indexes (rr_structs.h): 0 and 26 forwarded (inner IPv4, inner IPv6: each forward is counted
# once, by family; "forwarded" is their sum), DropReason's numbers (1..18, 23..25), then these. 23 is
# DropReason.TX_REFUSED, which the program never counts (counters.py reads it from the device).
STAT_FORWARDED = 0
STAT_PASSED = 19
STAT_CONN_HIT = 20
STAT_CONN_NEW = 21
STAT_CONN_INSERT = 22  # new rr_conns / rr_conns6 entries (the lookup found none): connection_evictions
STAT_FORWARDED_IPV6 = 26  # forwards whose inner packet is IPv6 (STAT_FORWARDED: IPv4)
STAT_ICMP_TOO_BIG = 28  # too-big answers sent; 27 is DropReason.ICMP_RATE_LIMITED
STAT_ICMP_ECHO = 29
STAT_QUIC_ROUTED = 30
STAT_FLOW_CACHE_HIT = 31  # hits served by a CPU's copy of the entry (rr_flow_cache); 20 counts the others
STAT_MAX = 32
ENGINE_STATS = {STAT_CONN_HIT: "conn_hit", STAT_CONN_NEW: "conn_new", STAT_CONN_INSERT: "conn_insert",
                STAT_FLOW_CACHE_HIT: "flow_cache_hit"}
"""Figures of this engine only (Counters.engine); counters.engine_figures makes conn_hit count both
kinds of hit."""
FLOW_CACHE_BITS = 10
"""RR_FLOW_CACHE_BITS: rr_flow_cache holds 2**10 slots per CPU."""
FLOW_CACHE_OFF = 1 << 63
"""RR_FLOW_CACHE_OFF: this bit set in rr_cache_gen[0] turns the flow cache off."""
OPTION_STATS = {STAT_ICMP_ECHO: "icmp_echo_replies", STAT_ICMP_TOO_BIG: "icmp_too_big", STAT_QUIC_ROUTED: "quic_routed"}
"""The per-service options' figures (Counters.options), named as core's Balancer.counters() names them."""


def stat_names() -> dict[int, str]:
    """rr_stats index -> name: forwarded_ipv4, forwarded_ipv6, passed, drop_<reason>, conn_hit, conn_new,
    conn_insert (counters.named adds "forwarded", the sum of the first two)."""
    names = {STAT_FORWARDED: "forwarded_ipv4", STAT_PASSED: "passed", STAT_FORWARDED_IPV6: "forwarded_ipv6",
             **ENGINE_STATS, **OPTION_STATS}
    for reason in DropReason:
        names[int(reason)] = f"drop_{reason.name.lower()}"
    return names


class RrConfig(ctypes.Structure):
    _fields_ = [
        ("local_addr", ctypes.c_uint8 * 4),
        ("local_mac", ctypes.c_uint8 * 6),
        ("pad", ctypes.c_uint16),
        ("hash_seed", ctypes.c_uint32),
        ("named_services", ctypes.c_uint32),
        ("catch_all", ctypes.c_uint32),
        ("catch_all_size", ctypes.c_uint32),
        ("table_stride", ctypes.c_uint32),
        ("conn_timeout_ns", ctypes.c_uint64 * 3),
        ("local_addr6", ctypes.c_uint8 * 16),
        ("named_services6", ctypes.c_uint32),
        ("catch_all_flags", ctypes.c_uint32),
        ("icmp_period_ns", ctypes.c_uint64),
        ("icmp_capacity_ns", ctypes.c_uint64),
        ("services_gen", ctypes.c_uint64),
        ("cache_services", ctypes.c_uint32),
        ("pad2", ctypes.c_uint32),
    ]


class RrBackend(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("mac", ctypes.c_uint8 * 6),
        ("has_mac", ctypes.c_uint8),
        ("in_use", ctypes.c_uint8),
        ("ipv6", ctypes.c_uint8),
        ("pad1", ctypes.c_uint8),
        ("mtu", ctypes.c_uint16),
        ("pad", ctypes.c_uint8 * 4),
    ]


class RrFlowKey(ctypes.Structure):
    """The 16 bytes of docs/WIRE.md section 6; `bytes(RrFlowKey)` equals core.flow's packed key."""

    _fields_ = [
        ("src", ctypes.c_uint8 * 4),
        ("dst", ctypes.c_uint8 * 4),
        ("sport", ctypes.c_uint8 * 2),
        ("dport", ctypes.c_uint8 * 2),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class RrFlowKey6(ctypes.Structure):
    """The 40 bytes of docs/WIRE.md section 6 for IPv6; `bytes(RrFlowKey6)` equals core.flow's packed key."""

    _fields_ = [
        ("src", ctypes.c_uint8 * 16),
        ("dst", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint8 * 2),
        ("dport", ctypes.c_uint8 * 2),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class RrConn(ctypes.Structure):
    _fields_ = [
        ("backend_addr", ctypes.c_uint8 * 16),
        ("backend_index", ctypes.c_uint32),
        ("flow_hash", ctypes.c_uint32),
        ("last_seen_ns", ctypes.c_uint64),
        ("svc_gen", ctypes.c_uint64),
        ("svc_index", ctypes.c_uint32),
        ("svc_table_size", ctypes.c_uint32),
        ("svc_flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class RrServiceKey(ctypes.Structure):
    """core/service.py's lookup entry: `ServiceMatcher.entries` keys are these 8 bytes."""

    _fields_ = [
        ("vip", ctypes.c_uint8 * 4),
        ("port", ctypes.c_uint8 * 2),
        ("proto", ctypes.c_uint8),
        ("fragment", ctypes.c_uint8),
    ]


class RrServiceKey6(ctypes.Structure):
    """core/service.py's lookup entry for an IPv6 VIP: 20 bytes."""

    _fields_ = [
        ("vip", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint8 * 2),
        ("proto", ctypes.c_uint8),
        ("fragment", ctypes.c_uint8),
    ]


class RrService(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("table_size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class RrIcmpBucket(ctypes.Structure):
    _fields_ = [
        ("credit_ns", ctypes.c_uint64),
        ("last_ns", ctypes.c_uint64),
    ]


class RrBackendStats(ctypes.Structure):
    """One CPU's rr_backend_stats value; the slot of (service index s, backend index b) is
    `backend_stats_slot(s, b)`."""

    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    ]


class RrFlowCacheEntry(ctypes.Structure):
    _fields_ = [
        ("key", ctypes.c_uint8 * 40),
        ("jiffies", ctypes.c_uint64),
        ("gen", ctypes.c_uint64),
        ("backend_index", ctypes.c_uint32),
        ("flow_hash", ctypes.c_uint32),
        ("svc_index", ctypes.c_uint32),
        ("six", ctypes.c_uint32),
    ]


class RrClock(ctypes.Structure):
    _fields_ = [
        ("jiffies", ctypes.c_uint64),
        ("ns", ctypes.c_uint64),
    ]


# Name -> mirror, for the layout test.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "rr_config": RrConfig,
    "rr_backend": RrBackend,
    "rr_flow_key": RrFlowKey,
    "rr_flow_key6": RrFlowKey6,
    "rr_flow_cache_entry": RrFlowCacheEntry,
    "rr_conn": RrConn,
    "rr_service_key": RrServiceKey,
    "rr_service_key6": RrServiceKey6,
    "rr_service": RrService,
    "rr_clock": RrClock,
    "rr_backend_stats": RrBackendStats,
    "rr_icmp_bucket": RrIcmpBucket,
}

KEY_SIZES = {MAP_CONFIG: 4, MAP_BACKENDS: 4, MAP_MAGLEV: 4, MAP_CONNS: ctypes.sizeof(RrFlowKey),
             MAP_CONNS6: ctypes.sizeof(RrFlowKey6), MAP_STATS: 4, MAP_SERVICES: ctypes.sizeof(RrServiceKey),
             MAP_SERVICES6: ctypes.sizeof(RrServiceKey6), MAP_MEMBERS: 4, MAP_BACKEND_STATS: 4, MAP_ICMP_BUCKET: 4,
             MAP_QUIC: 4, MAP_FLOW_CACHE: 4, MAP_CACHE_GEN: 4}
"""Key size of every map: a write whose key holds several keys is a batch (program.XdpProgram.write)."""


def backend_stats_slot(service_index: int, backend_index: int) -> int:
    """rr_backend_stats index of (service, backend) (rr_maps.h)."""
    return service_index * MAX_BACKENDS + backend_index


_V4_MAPPED = bytes(10) + b"\xff\xff"


def identity(address: AddressLike) -> bytes:
    """A backend's 16-byte identity in rr_backends and rr_conns: its IPv6 address, or its IPv4 address
    IPv4-mapped (::ffff:a.b.c.d, RFC 4291 2.5.5.2)."""
    n = address_int(address)
    return n.to_bytes(16, "big") if is_ipv6(n) else _V4_MAPPED + n.to_bytes(4, "big")


def from_identity(raw: bytes) -> int:
    """The backend (as int, core/address.py) an identity names."""
    raw = bytes(raw)
    return int.from_bytes(raw[12:] if raw[:12] == _V4_MAPPED else raw, "big")


def conn_map(key: bytes) -> str:
    """The connection table of a flow key: rr_conns for 16 bytes, rr_conns6 for 40."""
    return MAP_CONNS if len(key) == ctypes.sizeof(RrFlowKey) else MAP_CONNS6


def quic_key(service_index: int, server_id: int) -> int:
    """rr_quic's key of a service's server ID (rr_structs.h RR_QUIC_KEY)."""
    return service_index << 16 | server_id


def make_backend(addr: AddressLike, mac: bytes | None, in_use: bool = True, mtu: int = 0) -> RrBackend:
    """rr_backends' value; `mtu`: the largest IP packet toward it (0 for an unused entry)."""
    b = RrBackend()
    b.mtu = mtu
    b.addr = (ctypes.c_uint8 * 16)(*identity(addr))
    b.ipv6 = 1 if is_ipv6(address_int(addr)) else 0
    if mac is not None:
        if len(mac) != 6:
            raise ValueError("a MAC is 6 bytes")
        b.mac = (ctypes.c_uint8 * 6)(*mac)
    b.has_mac = 1 if mac is not None else 0
    b.in_use = 1 if in_use else 0
    return b


def flow_key_from_bytes(key: bytes) -> RrFlowKey | RrFlowKey6:
    if len(key) == ctypes.sizeof(RrFlowKey6):
        return RrFlowKey6.from_buffer_copy(key)
    if len(key) != ctypes.sizeof(RrFlowKey):
        raise ValueError("a flow key is 16 bytes (IPv4) or 40 (IPv6)")
    return RrFlowKey.from_buffer_copy(key)
