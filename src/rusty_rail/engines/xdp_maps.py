"""ctypes mirrors of src/rusty_rail/bpf/rr_structs.h, and the map names of rr_maps.h.

tests/test_xdp_layout.py compiles rr_structs.h with the host compiler and checks every size and field
offset here against it. Fields typed __be32/__be16 in C hold network-order bytes: they are mirrored as
byte arrays (addresses) or set through the helpers below, so nothing depends on the host's byte order.
"""

from __future__ import annotations

import ctypes
from ipaddress import IPv4Address

from rusty_rail.core.verdict import DropReason

MAP_CONFIG = "rr_config"
MAP_BACKENDS = "rr_backends"
MAP_MAGLEV = "rr_maglev"
MAP_CONNS = "rr_conns"
MAP_STATS = "rr_stats"
MAP_SERVICES = "rr_services"
MAP_MEMBERS = "rr_members"
MAP_BACKEND_STATS = "rr_backend_stats"
PROGRAM = "rr_balance"

MAX_BACKENDS = 4096
DEFAULT_TABLE_SIZE = 65537
DEFAULT_CONNS = 1 << 20
DEFAULT_MAX_SERVICES = 64
MEMBER_WORDS = MAX_BACKENDS // 64

TIMEOUT_TCP, TIMEOUT_UDP, TIMEOUT_OTHER = 0, 1, 2

# rr_stats indexes (rr_structs.h): 0 forwarded, 1..18 DropReason, then these.
STAT_FORWARDED = 0
STAT_PASSED = 19
STAT_CONN_HIT = 20
STAT_CONN_NEW = 21
STAT_CONN_INSERT = 22  # new rr_conns entries (the lookup found none): XdpBalancer.connection_evictions
STAT_MAX = 32


def stat_names() -> dict[int, str]:
    names = {STAT_FORWARDED: "forwarded", STAT_PASSED: "passed", STAT_CONN_HIT: "conn_hit", STAT_CONN_NEW: "conn_new",
             STAT_CONN_INSERT: "conn_insert"}
    for reason in DropReason:
        names[int(reason)] = f"drop_{reason.name.lower()}"
    return names


class RrConfig(ctypes.Structure):
    _fields_ = [
        ("local_addr", ctypes.c_uint8 * 4),
        ("local_mac", ctypes.c_uint8 * 6),
        ("pad", ctypes.c_uint16),
        ("table_size", ctypes.c_uint32),
        ("backend_count", ctypes.c_uint32),
        ("hash_seed", ctypes.c_uint32),
        ("services", ctypes.c_uint32),
        ("table_stride", ctypes.c_uint32),
        ("conn_timeout_ns", ctypes.c_uint64 * 3),
    ]


class RrBackend(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 4),
        ("mac", ctypes.c_uint8 * 6),
        ("has_mac", ctypes.c_uint8),
        ("in_use", ctypes.c_uint8),
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


class RrConn(ctypes.Structure):
    _fields_ = [
        ("backend_addr", ctypes.c_uint8 * 4),
        ("backend_index", ctypes.c_uint32),
        ("last_seen_ns", ctypes.c_uint64),
    ]


class RrServiceKey(ctypes.Structure):
    _fields_ = [
        ("vip", ctypes.c_uint8 * 4),
        ("port", ctypes.c_uint8 * 2),
        ("proto", ctypes.c_uint8),
        ("fragment", ctypes.c_uint8),
    ]


class RrService(ctypes.Structure):
    _fields_ = [
        ("index", ctypes.c_uint32),
        ("table_size", ctypes.c_uint32),
    ]


class RrBackendStats(ctypes.Structure):
    """One CPU's rr_backend_stats value; the slot of (service index s, backend index b) is
    `backend_stats_slot(s, b)`."""

    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    ]


def backend_stats_slot(service_index: int, backend_index: int) -> int:
    """rr_backend_stats index of (service, backend); open mode is service 0 (rr_maps.h)."""
    return service_index * MAX_BACKENDS + backend_index


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
    "rr_conn": RrConn,
    "rr_service_key": RrServiceKey,
    "rr_service": RrService,
    "rr_clock": RrClock,
    "rr_backend_stats": RrBackendStats,
}


def _bytes_array(n: int, data: bytes) -> ctypes.Array:
    if len(data) != n:
        raise ValueError(f"expected {n} bytes, got {len(data)}")
    return (ctypes.c_uint8 * n)(*data)


def make_config(
    local_addr: IPv4Address | str,
    local_mac: bytes,
    table_size: int,
    backend_count: int,
    hash_seed: int,
    timeouts_ns: tuple[int, int, int],
) -> RrConfig:
    cfg = RrConfig()
    cfg.local_addr = _bytes_array(4, IPv4Address(local_addr).packed)
    cfg.local_mac = _bytes_array(6, bytes(local_mac))
    cfg.table_size = table_size
    cfg.backend_count = backend_count
    cfg.hash_seed = hash_seed & 0xFFFFFFFF
    cfg.conn_timeout_ns = (ctypes.c_uint64 * 3)(*timeouts_ns)
    return cfg


def make_backend(addr: IPv4Address | str | int, mac: bytes | None, in_use: bool = True) -> RrBackend:
    b = RrBackend()
    b.addr = _bytes_array(4, IPv4Address(addr).packed)
    if mac is not None:
        b.mac = _bytes_array(6, bytes(mac))
    b.has_mac = 1 if mac is not None else 0
    b.in_use = 1 if in_use else 0
    return b


def flow_key_from_bytes(key: bytes) -> RrFlowKey:
    if len(key) != ctypes.sizeof(RrFlowKey):
        raise ValueError("a flow key is 16 bytes")
    return RrFlowKey.from_buffer_copy(key)


def service_key_bytes(vip: IPv4Address | str | int, port: int, proto: int, fragment: bool = False) -> bytes:
    """The 8 bytes of an rr_services key: vip | port (network order) | proto | fragment flag."""
    return IPv4Address(vip).packed + port.to_bytes(2, "big") + bytes((proto, 1 if fragment else 0))
