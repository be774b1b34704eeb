"""tc clsact + cls_bpf (direct action) through libbpf's own tc API: attach, query, detach.

    prog_id = tc.attach("eth0", prog_fd, tc.INGRESS, netns="rr-server1")
    tc.query("eth0", tc.INGRESS, netns="rr-server1")      # TcProgram(id, name), or None
    tc.detach("eth0", tc.INGRESS, netns="rr-server1")

Why libbpf (bpf_tc_hook_create / bpf_tc_attach / bpf_tc_query / bpf_tc_detach) and not pyroute2: the
kernel answers a query with the attached program's id (TCA_BPF_ID), which libbpf hands back as a
number, while pyroute2 0.9's cls_bpf decoder stops before that attribute; and it is the library that
already loads every program here, so there is one netlink implementation, not two. Its one cost:
libbpf talks to the namespace of the calling thread, so work in another namespace runs on a short
thread of its own that enters it (a thread's namespace dies with the thread: nothing to restore).

A filter is named by (direction, handle, priority): ours are handle 1, priority 49 unless told
otherwise, so other clsact filters on the device are left alone. The clsact qdisc stays when a filter
is removed (others may use it); deleting the device or its namespace removes both.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from . import libbpf
from .netns import in_netns
from .proginfo import loaded_program

__all__ = ["EGRESS", "INGRESS", "TcProgram", "attach", "detach", "program_name", "query"]

INGRESS = "ingress"
EGRESS = "egress"
DEFAULT_HANDLE = 1
DEFAULT_PRIORITY = 49

# enum bpf_tc_attach_point and bpf_tc_flags (libbpf.h)
_BPF_TC_INGRESS = 1 << 0
_BPF_TC_EGRESS = 1 << 1
_BPF_TC_F_REPLACE = 1 << 0
_POINTS = {INGRESS: _BPF_TC_INGRESS, EGRESS: _BPF_TC_EGRESS}


class _TcHook(ctypes.Structure):
    """struct bpf_tc_hook (libbpf 1.x); the trailing `size_t :0` is ctypes' own padding to 8."""

    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int), ("attach_point", ctypes.c_uint32),
                ("parent", ctypes.c_uint32)]


class _TcOpts(ctypes.Structure):
    """struct bpf_tc_opts (libbpf 1.x)."""

    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32), ("priority", ctypes.c_uint32)]


_lib = libbpf.lib
for _name in ("bpf_tc_hook_create", "bpf_tc_attach", "bpf_tc_query", "bpf_tc_detach"):
    _fn = getattr(_lib, _name)
    _fn.restype = ctypes.c_int
    _fn.argtypes = [ctypes.POINTER(_TcHook)] + ([] if _name == "bpf_tc_hook_create" else [ctypes.POINTER(_TcOpts)])
_lib.libbpf_set_print.restype = ctypes.c_void_p
_lib.libbpf_set_print.argtypes = [ctypes.c_void_p]
_quiet_lock = threading.Lock()

_T = TypeVar("_T")


@dataclass(frozen=True)
class TcProgram:
    """The program a filter runs, as the kernel reports it."""

    id: int
    name: str  # the kernel's copy: the C function's name, cut to 15 characters


def _call(fn: Callable[..., int], what: str, *args: object, ok: tuple[int, ...] = ()) -> int:
    """libbpf 1.x returns -errno; codes in `ok` come back as that positive errno instead of raising.

    With `ok`, libbpf's printer is off for the call: it would write the kernel's message for an
    expected answer ("Parent Qdisc doesn't exists" for a status query) to stderr. The printer is
    process-wide, hence the lock; the error itself still raises with its errno."""
    if ok:
        with _quiet_lock:
            previous = _lib.libbpf_set_print(None)
            try:
                ret = fn(*args)
            finally:
                _lib.libbpf_set_print(previous)
    else:
        ret = fn(*args)
    if ret < 0:
        code = -ret
        if code in ok:
            return code
        raise libbpf.LibbpfError(code, f"{what}: {os.strerror(code)}")
    return 0


def _in_netns(netns: str | None, fn: Callable[[], _T]) -> _T:
    """fn() in the network namespace `netns` (a name under /run/netns, or a path); None: here."""
    with in_netns(netns):
        return fn()


def _hook(interface: str, direction: str) -> _TcHook:
    if direction not in _POINTS:
        raise ValueError(f"direction must be {INGRESS!r} or {EGRESS!r}, not {direction!r}")
    # Resolved by the calling thread, so inside the namespace when run through _in_netns.
    return _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=socket.if_nametoindex(interface),
                   attach_point=_POINTS[direction])


def _opts(handle: int, priority: int, prog_fd: int = 0, flags: int = 0) -> _TcOpts:
    return _TcOpts(sz=ctypes.sizeof(_TcOpts), prog_fd=prog_fd, flags=flags, handle=handle, priority=priority)


def attach(interface: str, prog_fd: int, direction: str, *, handle: int = DEFAULT_HANDLE,
           priority: int = DEFAULT_PRIORITY, netns: str | None = None) -> int:
    """Run the loaded program `prog_fd` on the interface's clsact `direction`, direct action, as filter
    (handle, priority), replacing what that filter ran. Adds the clsact qdisc if the device has none.
    Returns the program id the kernel attached. The filter holds the program: prog_fd may be closed."""

    def work() -> int:
        hook = _hook(interface, direction)
        # The qdisc for both directions at once; EEXIST: already there (ours or anyone's), keep it.
        both = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=hook.ifindex, attach_point=_BPF_TC_INGRESS | _BPF_TC_EGRESS)
        _call(_lib.bpf_tc_hook_create, f"bpf_tc_hook_create({interface})", ctypes.byref(both), ok=(errno.EEXIST,))
        opts = _opts(handle, priority, prog_fd, _BPF_TC_F_REPLACE)
        _call(_lib.bpf_tc_attach, f"bpf_tc_attach({interface} {direction})", ctypes.byref(hook), ctypes.byref(opts))
        return int(opts.prog_id)

    return _in_netns(netns, work)


def query(interface: str, direction: str, *, handle: int = DEFAULT_HANDLE, priority: int = DEFAULT_PRIORITY,
          netns: str | None = None) -> TcProgram | None:
    """The program filter (handle, priority) on the interface's `direction` runs; None when there is no
    such filter (or no clsact qdisc at all)."""

    def work() -> int:
        hook = _hook(interface, direction)
        opts = _opts(handle, priority)
        # No filter: ENOENT; no clsact qdisc to look in: EINVAL.
        code = _call(_lib.bpf_tc_query, f"bpf_tc_query({interface} {direction})", ctypes.byref(hook),
                     ctypes.byref(opts), ok=(errno.ENOENT, errno.EINVAL))
        return 0 if code else int(opts.prog_id)

    prog_id = _in_netns(netns, work)
    return TcProgram(prog_id, program_name(prog_id)) if prog_id else None


def detach(interface: str, direction: str, *, handle: int = DEFAULT_HANDLE, priority: int = DEFAULT_PRIORITY,
           netns: str | None = None) -> bool:
    """Remove filter (handle, priority) from the interface's `direction`; False when it was not there."""

    def work() -> bool:
        hook = _hook(interface, direction)
        code = _call(_lib.bpf_tc_detach, f"bpf_tc_detach({interface} {direction})", ctypes.byref(hook),
                     ctypes.byref(_opts(handle, priority)), ok=(errno.ENOENT, errno.EINVAL))
        return code == 0

    return _in_netns(netns, work)


def program_name(prog_id: int) -> str:
    """The kernel's name of a loaded program (ids are global: no namespace needed); "" once it is gone."""
    try:
        fd = libbpf.prog_get_fd_by_id(prog_id)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return ""
        raise
    try:
        return loaded_program(fd).name
    finally:
        os.close(fd)
