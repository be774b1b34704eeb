"""The lab's pure parts: the addressing plan, the router's ECMP twin, and the BPF struct mirror."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from rusty_rail.bpf.build import BPF_DIR, object_path
from rusty_rail.core.constants import RR_HASH_SEED
from rusty_rail.core.flowhash import fmix32
from rusty_rail.lab import TOPOLOGIES, Lab, plan
from rusty_rail.lab.router import CFG, MAPS, MAX_TARGETS, STATS, flow_slot


@pytest.mark.parametrize("topology", sorted(TOPOLOGIES))
def test_plan_matches_the_original(topology: int) -> None:
    p = plan(topology, "rr-")
    clients, servers, balancers = TOPOLOGIES[topology]
    assert [c.address for c in p.clients] == [f"10.0.0.{i}" for i in range(1, clients + 1)]
    assert [s.address for s in p.servers] == [f"192.168.137.{20 + i}" for i in range(1, servers + 1)]
    assert [b.address for b in p.balancers] == [f"192.168.137.{10 + i}" for i in range(1, balancers + 1)]
    assert p.vip == "10.1.0.1"
    assert all(ns.startswith("rr-") for ns in p.namespaces)
    assert len(set(p.namespaces)) == len(p.namespaces)
    macs = [h.mac for h in (*p.clients, p.router_c, p.router, *p.balancers, *p.servers)]
    assert len(set(macs)) == len(macs)
    assert all(len(h.bridge_port) <= 15 for h in (*p.clients, p.router_c, p.router, *p.balancers, *p.servers))


@pytest.mark.parametrize("bad", ["", "-rr", "a b", "x" * 17, "rr/"])
def test_dangerous_prefixes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Lab(1, bad)


def test_flow_slot_is_deterministic_and_spreads() -> None:
    slots = [flow_slot("10.0.0.1", "10.1.0.1", 6, sport, 80, 2) for sport in range(40000, 41000)]
    assert slots == [flow_slot("10.0.0.1", "10.1.0.1", 6, sport, 80, 2) for sport in range(40000, 41000)]
    assert 400 < slots.count(0) < 600
    # Not TCP/UDP: the ports are not part of the hash.
    assert flow_slot("10.0.0.1", "10.1.0.1", 1, 1, 2, 7) == flow_slot("10.0.0.1", "10.1.0.1", 1, 3, 4, 7)


def test_flow_slot_is_fmix32_chained_over_the_tuple() -> None:
    """The exact function router_encap.c computes, written out once more from its parts."""
    h = fmix32(0x0A000001 ^ RR_HASH_SEED)
    h = fmix32(h ^ 0x0A010001)
    h = fmix32(h ^ (40000 << 16 | 80))
    assert flow_slot("10.0.0.1", "10.1.0.1", 6, 40000, 80, 1000) == fmix32(h ^ 6) % 1000


@pytest.mark.skipif(shutil.which("bpftool") is None or shutil.which("clang") is None, reason="needs clang, bpftool")
def test_python_mirrors_the_encap_header() -> None:
    btf = subprocess.run(["bpftool", "btf", "dump", "file", str(object_path("router_encap"))],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"STRUCT 'rr_encap_cfg' size=(\d+) vlen=4\n((?:\t.*\n){4})", btf)
    assert m is not None
    assert int(m.group(1)) == CFG.size
    fields = re.findall(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", m.group(2))
    assert fields == [("service_net", "0"), ("service_mask", "32"), ("src", "64"), ("count", "96")]
    header = (BPF_DIR / "router_encap.h").read_text()
    assert f"#define RR_ENCAP_MAX_TARGETS {MAX_TARGETS}\n" in header
    enum = re.findall(r"RR_ENCAP_(\w+) = (\d+),", header)
    assert enum[:-1] == [(name, str(i)) for i, name in
                         enumerate(["OK", "NO_TARGET", "NO_NEIGH", "FIB_FAIL", "ROOM_FAIL", "OK_WIRE"])]
    assert enum[-1] == ("STATS", str(len(STATS)))
    assert STATS == ("encapsulated", "no_target", "no_neigh", "fib_fail", "room_fail", "encapsulated_wire")
    source = (BPF_DIR / "router_encap.c").read_text()
    assert all(f"}} {name} SEC(\".maps\");" in source for name in MAPS)
