"""The lab router's GRE encapsulator (bpf/router_encap.c): load, attach, and its maps.

The program is loaded by this process through libbpf with its maps pinned under a directory of the
lab's own (/sys/fs/bpf/rusty_rail/<prefix>router/), not tc's shared /sys/fs/bpf/tc/globals, so two
labs with different prefixes never share a target list. tc then attaches the pinned program.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..bpf import libbpf
from .bpfobj import bpf_object
from .netns import ns_enter

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "rusty_rail"
PROGRAM = "rr_router_encap"
MAPS = ("rr_encap_cfg", "rr_encap_tgts", "rr_encap_stats")
MAX_TARGETS = 64  # RR_ENCAP_MAX_TARGETS
CFG = struct.Struct("=4s4s4sI")  # struct rr_encap_cfg: service_net, service_mask, src (network order), count
STATS = ("encapsulated", "no_target", "no_neigh", "fib_fail", "room_fail")  # enum rr_encap_stat
_KEY = struct.Struct("=I")
_TC_PREF = "49"


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf when nothing is mounted there (a fresh machine)."""
    with open("/proc/self/mounts") as f:
        if any(line.split()[1] == str(BPFFS) and line.split()[2] == "bpf" for line in f):
            return
    subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)


def pin_dir(prefix: str) -> Path:
    return PIN_ROOT / f"{prefix}router"


def attach(ns: str, device: str, pins: Path) -> None:
    """Load router_encap.o, pin program and maps in pins, attach on device's egress inside ns."""
    ensure_bpffs()
    shutil.rmtree(pins, ignore_errors=True)  # a fresh program gets fresh maps
    pins.mkdir(parents=True)
    prog_pin = pins / "prog"
    with libbpf.BpfObject(str(bpf_object("router_encap"))) as obj:
        obj.load()
        for name in MAPS:
            obj.map(name).pin(str(pins / name))
        libbpf.obj_pin(obj.program(PROGRAM).fd, str(prog_pin))
    tc = [*ns_enter(ns), "tc"]
    subprocess.run([*tc, "qdisc", "replace", "dev", device, "clsact"], check=True, capture_output=True)
    subprocess.run(
        [*tc, "filter", "replace", "dev", device, "egress", "pref", _TC_PREF, "handle", "1",
         "bpf", "direct-action", "object-pinned", str(prog_pin)],
        check=True, capture_output=True, text=True,
    )


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


def _mix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def flow_slot(src: str, dst: str, proto: int, sport: int, dport: int, count: int) -> int:
    """Which target index the router picks for this inner flow: the Python twin of flow_hash()."""
    s = int(ipaddress.IPv4Address(src))
    d = int(ipaddress.IPv4Address(dst))
    ports = (sport << 16 | dport) if proto in (6, 17) else 0
    h = _mix(s ^ 0x52525F31)
    h = _mix(h ^ d)
    h = _mix(h ^ ports)
    return _mix(h ^ proto) % count
