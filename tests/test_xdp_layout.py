"""The ctypes mirrors in engines/xdp/maps.py against the C layout of bpf/rr_structs.h.

The header is compiled with the host C compiler (x86-64, the same ABI as the BPF target for these
fixed-width fields) into a program that prints every sizeof and offsetof, and the constants.
"""

from __future__ import annotations

import ctypes
import shutil
from ipaddress import IPv6Address
import subprocess
from pathlib import Path

import pytest

from rusty_rail.core.verdict import DropReason
from rusty_rail.core.service import ServiceKey, ServiceProtocol
from rusty_rail.core.options import HashFields
from rusty_rail.engines.xdp import maps as m

BPF_DIR = Path(__file__).resolve().parent.parent / "src" / "rusty_rail" / "bpf"

CONSTANTS = {
    "RR_STAT_FORWARDED": m.STAT_FORWARDED,
    "RR_STAT_PASSED": m.STAT_PASSED,
    "RR_STAT_CONN_HIT": m.STAT_CONN_HIT,
    "RR_STAT_CONN_NEW": m.STAT_CONN_NEW,
    "RR_STAT_CONN_INSERT": m.STAT_CONN_INSERT,
    "RR_STAT_FORWARDED_IPV6": m.STAT_FORWARDED_IPV6,
    "RR_STAT_MAX": m.STAT_MAX,
    "RR_EXT_HEADERS": m.EXT_HEADERS,
    "RR_MAX_BACKENDS": m.MAX_BACKENDS,
    "RR_DEFAULT_TABLE_SIZE": m.DEFAULT_TABLE_SIZE,
    "RR_DEFAULT_CONNS": m.DEFAULT_CONNS,
    "RR_DEFAULT_MAX_SERVICES": m.DEFAULT_MAX_SERVICES,
    "RR_MEMBER_WORDS": m.MEMBER_WORDS,
    "RR_TIMEOUT_TCP": m.TIMEOUT_TCP,
    "RR_TIMEOUT_UDP": m.TIMEOUT_UDP,
    "RR_TIMEOUT_OTHER": m.TIMEOUT_OTHER,
    "RR_STAT_ICMP_TOO_BIG": m.STAT_ICMP_TOO_BIG,
    "RR_STAT_ICMP_ECHO": m.STAT_ICMP_ECHO,
    "RR_STAT_QUIC_ROUTED": m.STAT_QUIC_ROUTED,
    "RR_STAT_FLOW_CACHE_HIT": m.STAT_FLOW_CACHE_HIT,
    "RR_FLOW_CACHE_BITS": m.FLOW_CACHE_BITS,
    "RR_FLOW_CACHE_OFF": m.FLOW_CACHE_OFF,
    "RR_MAX_QUIC_IDS": m.MAX_QUIC_IDS,
    "RR_OPT_HASH_MASK": m.OPT_HASH_MASK,
    "RR_OPT_NO_CONNS": m.OPT_NO_CONNS,
    "RR_OPT_ANSWER_PING": m.OPT_ANSWER_PING,
    "RR_OPT_QUIC": m.OPT_QUIC,
    "RR_OPT_HASH_SOURCE_IP": int(HashFields.SOURCE_IP),
    "RR_OPT_HASH_SOURCE_IP_PORT": int(HashFields.SOURCE_IP_PORT),
    **{f"RR_DROP_{reason.name}": int(reason) for reason in DropReason},
}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "rr_structs.h"', "int main(void) {"]
    for cname, mirror in m.STRUCTS.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for field, _ in mirror._fields_:
            lines.append(f'printf("{cname}.{field} %zu\\n", offsetof(struct {cname}, {field}));')
            lines.append(f'printf("{cname}.{field}.size %zu\\n", sizeof(((struct {cname} *)0)->{field}));')
    for name in CONSTANTS:
        lines.append(f'printf("{name} %llu\\n", (unsigned long long)({name}));')
    lines += ["return 0; }"]
    work = tmp_path_factory.mktemp("layout")
    src = work / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = work / "layout"
    subprocess.run([cc, f"-I{BPF_DIR}", "-o", str(exe), str(src)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("cname", list(m.STRUCTS))
def test_struct_size_and_offsets(c_layout, cname) -> None:
    mirror = m.STRUCTS[cname]
    assert ctypes.sizeof(mirror) == c_layout[cname]
    for field, ctype in mirror._fields_:
        assert getattr(mirror, field).offset == c_layout[f"{cname}.{field}"], field
        assert ctypes.sizeof(ctype) == c_layout[f"{cname}.{field}.size"], field


@pytest.mark.parametrize("name", list(CONSTANTS))
def test_constants_match_header(c_layout, name) -> None:
    assert CONSTANTS[name] == c_layout[name]


def test_mirrors_cover_every_c_field(c_layout) -> None:
    """No C field is missing from a mirror: the fields' sizes add up to the struct (no padding)."""
    for cname, mirror in m.STRUCTS.items():
        assert sum(c_layout[f"{cname}.{f}.size"] for f, _ in mirror._fields_) == c_layout[cname], cname


def test_flow_key_bytes_are_the_wire_key() -> None:
    from tests.oracle import oracle_key

    key = oracle_key("10.0.0.1", "10.1.0.1", 6, 40000, 80)
    mirror = m.flow_key_from_bytes(key)
    assert bytes(mirror.src) == bytes([10, 0, 0, 1])
    assert bytes(mirror.sport) == (40000).to_bytes(2, "big")
    assert mirror.proto == 6
    assert bytes(mirror) == key


def test_service_lookup_entries_are_the_c_key() -> None:
    """core/service.py's lookup entries (ServiceMatcher.entries) are rr_services keys as they are."""
    from ipaddress import IPv4Address

    entry = ServiceKey(IPv4Address("10.1.0.1"), ServiceProtocol.TCP, 80).entry(fragment=True)
    assert len(entry) == ctypes.sizeof(m.RrServiceKey) == m.KEY_SIZES[m.MAP_SERVICES]
    key = m.RrServiceKey.from_buffer_copy(entry)
    assert bytes(key.vip) == bytes([10, 1, 0, 1])
    assert bytes(key.port) == (80).to_bytes(2, "big")
    assert key.proto == 6 and key.fragment == 1


def test_ipv6_keys_and_entries_are_the_c_keys() -> None:
    from ipaddress import IPv6Address

    from tests.oracle import oracle_key

    key = oracle_key("2001:db8::1", "2001:db8:1::1", 17, 5353, 53)
    mirror = m.flow_key_from_bytes(key)
    assert isinstance(mirror, m.RrFlowKey6) and bytes(mirror) == key
    assert bytes(mirror.dst) == IPv6Address("2001:db8:1::1").packed and mirror.proto == 17
    entry = ServiceKey(IPv6Address("2001:db8:1::1"), ServiceProtocol.UDP, 53).entry()
    assert len(entry) == ctypes.sizeof(m.RrServiceKey6) == m.KEY_SIZES[m.MAP_SERVICES6] == 20
    assert bytes(m.RrServiceKey6.from_buffer_copy(entry).port) == (53).to_bytes(2, "big")


def test_backend_identities_are_distinct_and_invertible() -> None:
    from rusty_rail.core.address import address_int

    for text in ("10.2.0.1", "2001:db8:2::1", "64:ff9b::a02:1"):
        n = address_int(text)
        assert m.from_identity(m.identity(n)) == n
        backend = m.make_backend(n, b"\x02" * 6)
        assert bytes(backend.addr) == m.identity(n) and backend.ipv6 == (":" in text)
    assert m.identity("10.2.0.1") == IPv6Address("::ffff:10.2.0.1").packed


def test_key_sizes_are_the_structs() -> None:
    assert m.KEY_SIZES[m.MAP_CONNS] == ctypes.sizeof(m.RrFlowKey) == 16
    assert m.KEY_SIZES[m.MAP_CONNS6] == ctypes.sizeof(m.RrFlowKey6) == 40
    assert set(m.KEY_SIZES) == set(m.MAPS)
