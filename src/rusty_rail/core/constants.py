"""Every number and path that more than one part of Rusty Rail must agree on, in one place.

Pure data: importing this module does nothing. The C programs cannot import it; where they repeat a
value (bpf/rr_structs.h, bpf/rr_hash.h) tests/test_constants.py compares the two.
"""

from __future__ import annotations

DEFAULT_TABLE_SIZE = 65537
"""Maglev table size M (prime); the paper's choice for up to a few hundred backends."""
MAX_TABLE_SIZE = 4_000_037
"""The largest table a configuration may ask for: tables are rebuilt in Python on every change."""

RR_HASH_SEED = 0x52525F31
"""murmur3 seed of the flow hash (docs/WIRE.md section 6); every balancer uses the same one."""

DEFAULT_CONN_CAPACITY = 1 << 20
"""Connection-table entries (least recently used evicted beyond), per worker on AF_PACKET."""
MAX_CONN_CAPACITY = 1 << 26
"""64 Mi entries: the XDP map alone would take several GiB beyond this."""

FLOW_COUNT_LIMIT = 200_000
"""Above this many connection entries, status leaves per-backend flow counts out: counting walks the
whole table (in Python on AF_PACKET, holding the GIL the packet loop needs)."""

MAX_WEIGHT = 1000
"""A weight is extra Maglev turns per round; beyond this the ratios are finer than the table can show."""

GRE_OVERHEAD = 24
"""Outer IPv4 header (20 bytes, no options) + base GRE header (4): what encapsulation adds."""
GRE6_OVERHEAD = 44
"""Outer IPv6 header (40 bytes, no extension headers) + base GRE header (4)."""

DEFAULT_MTU = 1500
"""The device MTU a Balancer assumes when it is not told (Ethernet's); engines read the device's."""

ICMP_TOO_BIG_RATE = 1000
"""ICMP "fragmentation needed" / ICMPv6 "packet too big" answers per second, per CPU (XDP) or worker
(AF_PACKET): Linux's net.ipv4.icmp_msgs_per_sec default (docs/WIRE.md section 8b)."""
ICMP_TOO_BIG_BURST = 50
"""Answers at once before the rate applies: Linux's net.ipv4.icmp_msgs_burst default."""

BPFFS = "/sys/fs/bpf"
"""Where the BPF filesystem is mounted by convention."""
DEFAULT_PIN_ROOT = BPFFS + "/rusty_rail"
"""RR_PIN_ROOT's default: handover pins (a directory per namespace and device) and the lab's pins."""
