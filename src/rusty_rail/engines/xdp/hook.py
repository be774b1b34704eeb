"""Sharing the XDP hook: whose program runs on the device, and how ours goes on (plain or dispatcher).

    plan = plan_hook(options, mode)     # HookPlan(PLAIN | DISPATCHER, why), or HookRefused (one line)

A device runs one XDP program. Ours is replaced atomically (XDP_FLAGS_REPLACE) on a restart, as a
handover's successor or after a killed run. Anyone else's is never replaced: the device is shared
through libxdp's dispatcher (dispatcher.py) when it can be, and otherwise the start is refused with
one line naming the device, the program, libxdp's reason and the fix, before anything is touched.

Ours, the rule: an XDP program named rr_balance (the kernel keeps the C function's name, bpf/
xdp_balancer.c) that uses a map named rr_conns. Every release's program, a handover predecessor's or a
killed run's leftover, has both; the program's tag (a hash of its instructions) is not part of the rule
because it changes with every release, and a successor must replace an older release. Read with
bpf_obj_get_info_by_fd (libbpf), never from `ip` or `bpftool` output.

`xdp_dispatcher` (EngineOptions; the file's key, RR_XDP_DISPATCHER):
- false (default): a plain attach, unless a foreign program runs there (then the dispatcher, or refuse);
- true: always through the dispatcher, refused with the fix "set xdp_dispatcher = false" where it
  cannot load. In either case xdp_mode picks libxdp's mode: native = XDP_MODE_NATIVE, generic =
  XDP_MODE_SKB (auto as mode.py decides). A hitless restart is refused in dispatcher mode (engine.py):
  libxdp replaces a component only by building a new dispatcher, never in place.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from rusty_rail.bpf import libbpf
from rusty_rail.bpf.proginfo import loaded_program
from rusty_rail.dataplane import EngineError, EngineOptions
from rusty_rail.engines.xdp import dispatcher
from rusty_rail.engines.xdp import maps as m

__all__ = ["HookKind", "HookPlan", "HookRefused", "RunningProgram", "foreign_refusal", "only_ours", "plan_device_hook",
           "plan_hook",            "program_info", "running_program"]

DISPATCHER_PROGRAM = "xdp_dispatcher"
"""libxdp's dispatcher's program name."""
BPF_PROG_TYPE_XDP = 6


@dataclass(frozen=True)
class RunningProgram:
    """The XDP program a device runs, as the kernel describes it."""

    id: int
    name: str
    tag: str
    """Hex, for the operator (bpftool shows the same)."""
    maps: tuple[str, ...]

    @property
    def ours(self) -> bool:
        return self.name == m.PROGRAM and m.MAP_CONNS in self.maps

    @property
    def is_dispatcher(self) -> bool:
        return self.name == DISPATCHER_PROGRAM

    def describe(self) -> str:
        return f"XDP program {self.id} {self.name!r} (tag {self.tag})"


def _map_name(map_id: int) -> str:
    fd = libbpf.lib.bpf_map_get_fd_by_id(map_id)
    if fd < 0:
        return ""  # gone meanwhile
    try:
        return libbpf.map_info(fd).name.decode(errors="replace")
    finally:
        os.close(fd)


def program_info(fd: int) -> RunningProgram:
    """Name, tag and map names of the loaded program behind `fd`."""
    program = loaded_program(fd)
    return RunningProgram(program.id, program.name, program.tag, tuple(_map_name(i) for i in program.map_ids))


def running_program(ifindex: int) -> RunningProgram | None:
    """The XDP program on `ifindex` (this thread's namespace, any mode), None when there is none."""
    prog_id = libbpf.xdp_query_id(ifindex, 0)
    if not prog_id:
        return None
    try:
        fd = libbpf.prog_get_fd_by_id(prog_id)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None  # detached and freed meanwhile
        raise
    try:
        return program_info(fd)
    finally:
        os.close(fd)


def _probe(running: RunningProgram | None) -> tuple[bool, str]:
    if running is None:
        return dispatcher.probe()
    return dispatcher.probe(running.name, running.is_dispatcher)


class HookKind(str, Enum):
    PLAIN = "plain"
    DISPATCHER = "dispatcher"


@dataclass(frozen=True)
class HookPlan:
    kind: HookKind
    why: str
    """In words, for the start-up log line."""


class HookRefused(EngineError):
    """The device's hook cannot be taken without replacing someone else's program: one line, with the fix."""


def foreign_refusal(device: str, running: RunningProgram, why: str) -> HookRefused:
    """The one line refusing to take `device` from someone else's program, with the fixes."""
    return HookRefused(
        f"{running.describe()}, not Rusty Rail's, runs on {device}; it is not replaced, and libxdp's dispatcher "
        f"cannot share the device: {why}; fix: detach that program (`ip link set {device} xdp off`, or its "
        f"own tool), or run on a kernel that allows libxdp's dispatcher with that program loaded through "
        f"libxdp, or use engine = afpacket")


def only_ours(device: str) -> Callable[[int], None]:
    """XdpProgram.attach's `may_replace` for a plain attach: a program that appeared on the device after
    plan_hook looked, not ours, is refused rather than replaced."""

    def check(fd: int) -> None:
        running = program_info(fd)
        if not running.ours:
            raise foreign_refusal(device, running, _probe(running)[1])

    return check


def plan_device_hook(options: EngineOptions, mode: str) -> HookPlan | None:
    """plan_hook for options.device by name; None when there is no such device (start() says so)."""
    try:
        ifindex = socket.if_nametoindex(options.device)
    except OSError:
        return None
    return plan_hook(options, ifindex, mode)


def plan_hook(options: EngineOptions, ifindex: int, mode: str) -> HookPlan:
    """How to attach to `ifindex` (options.device, this thread's namespace) in `mode` ("native" | "skb"),
    or HookRefused saying why not and what to do. Touches nothing."""
    device = options.device
    running = running_program(ifindex)
    if options.xdp_dispatcher:
        if running is not None and running.ours:
            raise HookRefused(
                f"xdp_dispatcher = true, but Rusty Rail's own {running.describe()} runs on {device} without "
                f"libxdp's dispatcher (an earlier run's): moving it into a dispatcher would leave the device "
                f"without a program; stop that run first (its stop detaches), or set xdp_dispatcher = false "
                f"to replace it atomically")
        usable, why = _probe(running)
        if not usable:
            raise HookRefused(f"xdp_dispatcher = true, but libxdp's dispatcher cannot be used on {device}: {why}; "
                              f"set xdp_dispatcher = false for a plain attach")
        return HookPlan(HookKind.DISPATCHER, f"through libxdp's dispatcher (xdp_dispatcher = true), {mode} mode")
    if running is None:
        return HookPlan(HookKind.PLAIN, "plain attach (no XDP program on the device)")
    if running.ours:
        return HookPlan(HookKind.PLAIN, f"plain attach replacing Rusty Rail's own {running.describe()} atomically")
    usable, why = _probe(running)
    if not usable:
        raise foreign_refusal(device, running, why)
    return HookPlan(HookKind.DISPATCHER, f"through libxdp's dispatcher beside {running.describe()}, {mode} mode")
