"""The lab router's GRE encapsulator (bpf/router_encap.c): load, attach, and its maps.

The program is loaded by this process through libbpf with its maps pinned under a directory of the
lab's own (<DEFAULT_PIN_ROOT>/<prefix>router/), so two labs with different prefixes never share a
target list; other processes (router_health.py, `lab status`) open the maps there. The program
itself needs no pin: the tc filter holds it.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..bpf import bpffs, libbpf, tc
from ..bpf.build import object_path
from ..core.constants import BPFFS, DEFAULT_PIN_ROOT, RR_HASH_SEED
from ..core.flowhash import fmix32

PROGRAM = "rr_router_encap"
MAPS = ("rr_encap_cfg", "rr_encap_tgts", "rr_encap_stats")
MAX_TARGETS = 64  # RR_ENCAP_MAX_TARGETS
CFG = struct.Struct("=4s4s4sI")  # struct rr_encap_cfg: service_net, service_mask, src (network order), count
# enum rr_encap_stat, in order. "encapsulated" counts skbs (a GSO super-packet once); compare a
# balancer's "forwarded" (wire packets) with "encapsulated_wire".
STATS = ("encapsulated", "no_target", "no_neigh", "fib_fail", "room_fail", "encapsulated_wire")
_KEY = struct.Struct("=I")
_TC_PRIORITY = 49
_TC_HANDLE = 1


def ensure_bpffs() -> None:
    """Mount bpffs at BPFFS when nothing is mounted there (a fresh machine); bpffs.PinRootError if not."""
    bpffs.prepare(BPFFS)


def pin_dir(prefix: str) -> Path:
    return Path(DEFAULT_PIN_ROOT) / f"{prefix}router"


def attach(ns: str, device: str, pins: Path) -> int:
    """Load router_encap.o, pin its maps in pins, attach it on device's egress inside ns.
    Returns the program's id."""
    ensure_bpffs()
    shutil.rmtree(pins, ignore_errors=True)  # a fresh program gets fresh maps
    pins.mkdir(parents=True)
    with libbpf.BpfObject(str(object_path("router_encap"))) as obj:
        obj.load()
        for name in MAPS:
            obj.map(name).pin(str(pins / name))
        return tc.attach(device, obj.program(PROGRAM).fd, tc.EGRESS, handle=_TC_HANDLE, priority=_TC_PRIORITY,
                         netns=ns)


def remove_pins(prefix: str) -> None:
    shutil.rmtree(pin_dir(prefix), ignore_errors=True)


def _addr(a: str) -> bytes:
    return ipaddress.IPv4Address(a).packed


@dataclass(frozen=True)
class RouterMaps:
    """The pinned maps of one lab's router, opened by path for each operation (no fds kept)."""

    pins: Path

    def _fd(self, name: str) -> int:
        return libbpf.obj_get(str(self.pins / name))

    def configure(self, service_net: str, src: str, targets: Sequence[str]) -> None:
        """Set the service prefix, the outer source and the targets, in that order of safety:
        targets are written before the count that makes them visible."""
        if len(targets) > MAX_TARGETS:
            raise ValueError(f"at most {MAX_TARGETS} targets")
        net = ipaddress.IPv4Network(service_net)
        fd = self._fd("rr_encap_tgts")
        try:
            for i, t in enumerate(targets):
                libbpf.map_update(fd, _KEY.pack(i), _addr(t))
        finally:
            os.close(fd)
        fd = self._fd("rr_encap_cfg")
        try:
            cfg = CFG.pack(net.network_address.packed, net.netmask.packed, _addr(src), len(targets))
            libbpf.map_update(fd, _KEY.pack(0), cfg)
        finally:
            os.close(fd)

    def config(self) -> tuple[str, str, list[str]]:
        """(service prefix, outer source, targets) as currently written."""
        fd = self._fd("rr_encap_cfg")
        try:
            raw = libbpf.map_lookup(fd, _KEY.pack(0), CFG.size) or bytes(CFG.size)
        finally:
            os.close(fd)
        net, mask, src, count = CFG.unpack(raw)
        prefix = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(net)}/{ipaddress.IPv4Address(mask)}")
        fd = self._fd("rr_encap_tgts")
        try:
            targets = [
                str(ipaddress.IPv4Address(libbpf.map_lookup(fd, _KEY.pack(i), 4) or bytes(4))) for i in range(count)
            ]
        finally:
            os.close(fd)
        return str(prefix), str(ipaddress.IPv4Address(src)), targets

    def stats(self) -> dict[str, int]:
        fd = self._fd("rr_encap_stats")
        try:
            return {
                name: struct.unpack("=Q", libbpf.map_lookup(fd, _KEY.pack(i), 8) or bytes(8))[0]
                for i, name in enumerate(STATS)
            }
        finally:
            os.close(fd)


def flow_slot(src: str, dst: str, proto: int, sport: int, dport: int, count: int) -> int:
    """Which target index the router picks for this inner flow: the Python twin of router_encap.c's
    flow_hash() (murmur3's finaliser chained over the tuple; not the balancers' murmur3 of WIRE.md)."""
    s = int(ipaddress.IPv4Address(src))
    d = int(ipaddress.IPv4Address(dst))
    ports = (sport << 16 | dport) if proto in (6, 17) else 0
    h = fmix32(s ^ RR_HASH_SEED)
    h = fmix32(h ^ d)
    h = fmix32(h ^ ports)
    return fmix32(h ^ proto) % count
