"""Sharing the XDP hook through libxdp's multi-program dispatcher (Debian `libxdp1`, xdp-tools 1.3).

A device runs one XDP program. libxdp's dispatcher is that program: it calls each component in turn,
by priority (`run_prio`, lower first), on to the next while a component returns an action in its
`chain_call_actions` (XDP_PASS by default), and keeps its state (which components, their links) pinned
in a bpffs, `<bpffs>/xdp/dispatch-<ifindex>-<id>`, so every process that uses libxdp sees it. A
component is loaded as a BPF_PROG_TYPE_EXT program replacing one of the dispatcher's slots, which is
why libxdp must load it itself (from the object's BTF and its `SEC("xdp")` program); a firewall
(xdp-filter) and Rusty Rail then run side by side.

`attach()` hands libxdp a second bpf_object of the balancer's file whose maps are the running
XdpProgram's (bpf_map__reuse_fd), so the component libxdp loads reads and writes the same maps; the
XdpProgram's own XDP instance stays loaded, unattached, for BPF_PROG_TEST_RUN. Only libxdp's C API is
used (ctypes), never xdp-loader's output.

What this does not do (engine.py refuses it with the fix): a hitless restart, since libxdp replaces a
component only by building a new dispatcher around the new set of programs, not atomically in place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

from rusty_rail.bpf import bpffs, build, libbpf

__all__ = ["AttachMode", "Component", "DispatcherError", "XdpComponent", "available", "bpffs_dir", "components",
           "has_dispatcher", "kernel_refusal", "probe"]

SECTION = b"xdp"
"""The ELF section of the balancer's (and xdp_pass's) program: libxdp finds the program by it."""
OBJECT_PATH_ENV = "LIBXDP_OBJECT_PATH"
"""libxdp's variable for where its BPF objects (xdp-dispatcher.o) are; Debian's default below."""
DEFAULT_OBJECT_DIRS = ("/usr/lib/x86_64-linux-gnu/bpf", "/usr/lib/aarch64-linux-gnu/bpf", "/usr/lib/bpf",
                       "/usr/local/lib/bpf")
BPF_PROG_TYPE_EXT = 28
BPFFS_ENV = "LIBXDP_BPFFS"
"""libxdp's variable for its bpffs (default /sys/fs/bpf): every user of one dispatcher must share it."""


class AttachMode(IntEnum):
    """enum xdp_attach_mode (xdp/libxdp.h)."""

    UNSPEC = 0
    NATIVE = 1
    SKB = 2
    HW = 3


_MODES = {"native": AttachMode.NATIVE, "skb": AttachMode.SKB}


class DispatcherError(OSError):
    pass


def _load() -> tuple[ctypes.CDLL | None, str]:
    name = ctypes.util.find_library("xdp") or "libxdp.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        return None, f"libxdp is absent ({exc}; Debian package libxdp1)"
    vp, i, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
    for fn, res, args in (
        ("xdp_program__from_bpf_obj", vp, [vp, ctypes.c_char_p]),
        ("xdp_program__open_file", vp, [ctypes.c_char_p, ctypes.c_char_p, vp]),
        ("xdp_program__attach", i, [vp, i, i, u]),
        ("xdp_program__detach", i, [vp, i, i, u]),
        ("xdp_program__close", None, [vp]),
        ("xdp_program__name", ctypes.c_char_p, [vp]),
        ("xdp_program__id", ctypes.c_uint32, [vp]),
        ("xdp_program__run_prio", u, [vp]),
        ("xdp_program__set_run_prio", i, [vp, u]),
        ("xdp_multiprog__get_from_ifindex", vp, [i]),
        ("xdp_multiprog__next_prog", vp, [vp, vp]),
        ("xdp_multiprog__main_prog", vp, [vp]),
        ("xdp_multiprog__is_legacy", ctypes.c_bool, [vp]),
        ("xdp_multiprog__close", None, [vp]),
        ("libxdp_get_error", ctypes.c_long, [vp]),
        ("libxdp_strerror", i, [i, ctypes.c_char_p, ctypes.c_size_t]),
    ):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib, "libxdp1 loaded"


_lib, _why = _load()


def available() -> tuple[bool, str]:
    """(libxdp can be used here, why not / what was loaded)."""
    return _lib is not None, _why


def _need() -> ctypes.CDLL:
    if _lib is None:
        raise DispatcherError(errno.ENOSYS, _why)
    return _lib


def _strerror(err: int) -> str:
    buf = ctypes.create_string_buffer(256)
    _need().libxdp_strerror(err, buf, len(buf))
    return buf.value.decode(errors="replace") or os.strerror(abs(err))


def _ptr(ptr: int | None, what: str) -> int:
    """libxdp returns NULL (errno set) or an ERR_PTR: libxdp_get_error reads both."""
    err = _need().libxdp_get_error(ptr)
    if err or not ptr:
        err = err or -(ctypes.get_errno() or errno.EINVAL)
        raise DispatcherError(-err, f"{what}: {_strerror(err)}")
    return ptr


def bpffs_dir() -> str:
    return os.environ.get(BPFFS_ENV) or "/sys/fs/bpf"


def check_bpffs() -> None:
    """libxdp keeps the dispatcher's state in a bpffs shared by every program on the device: refuse,
    with the fix, where there is none (e.g. under `ip netns exec`, which mounts a fresh /sys)."""
    where = bpffs_dir()
    if not bpffs.is_bpffs(where):
        raise DispatcherError(errno.ENOENT, (
            f"libxdp's dispatcher needs the bpffs every program on the device shares, and {where} is none: "
            f"run where the host's /sys/fs/bpf is mounted (e.g. `nsenter --net=/run/netns/NAME` instead of "
            f"`ip netns exec`, which mounts a fresh /sys), mount one (`mount -t bpf bpf {where}`), or set "
            f"{BPFFS_ENV}"))


_kernel_refusal: str | None | bool = False  # False: not checked yet


def _dispatcher_object() -> str | None:
    dirs = [os.environ[OBJECT_PATH_ENV]] if os.environ.get(OBJECT_PATH_ENV) else list(DEFAULT_OBJECT_DIRS)
    for d in dirs:
        path = os.path.join(d, "xdp-dispatcher.o")
        if os.path.exists(path):
            return path
    return None


def kernel_refusal() -> str | None:
    """Why this kernel refuses libxdp's dispatcher, None when it allows it; checked once, touching no device.

    The same check as libxdp's own before it builds a dispatcher: load its xdp-dispatcher.o, then a
    component as a freplace (BPF_PROG_TYPE_EXT) program on the dispatcher's first slot, prog0. Where
    that load fails, libxdp falls back to a plain attach, which is no sharing at all (measured: kernel
    6.18 here answers EPERM)."""
    global _kernel_refusal
    if _kernel_refusal is not False:
        return _kernel_refusal  # type: ignore[return-value]
    path = _dispatcher_object()
    if path is None:
        _kernel_refusal = f"libxdp's xdp-dispatcher.o is not installed (looked in {OBJECT_PATH_ENV} or " \
                          f"{', '.join(DEFAULT_OBJECT_DIRS)}; Debian package libxdp1)"
        return _kernel_refusal
    lib = libbpf.lib
    lib.libbpf_set_print.restype, lib.libbpf_set_print.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    lib.bpf_program__set_type.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.bpf_program__set_attach_target.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
    previous = lib.libbpf_set_print(None)  # the refusal is reported in one line, not libbpf's lines
    try:
        with libbpf.BpfObject(path) as main, libbpf.BpfObject(str(build.object_path("xdp_pass"))) as component:
            main.load()
            program = component.program("rr_pass")
            lib.bpf_program__set_type(program._ptr, BPF_PROG_TYPE_EXT)
            lib.bpf_program__set_attach_target(program._ptr, main.program("xdp_dispatcher").fd, b"prog0")
            component.load()
        _kernel_refusal = None
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        _kernel_refusal = (f"the kernel refused libxdp's dispatcher: loading a component as a freplace "
                           f"(BPF_PROG_TYPE_EXT) program on it failed with {name} ({os.strerror(exc.errno or 0)})")
    finally:
        lib.libbpf_set_print(previous)
    return _kernel_refusal


def probe(running_name: str | None = None, running_is_dispatcher: bool = False) -> tuple[bool, str]:
    """(libxdp's dispatcher can be used on a device running `running_name` (None: nothing), why not).
    libxdp adds a program only to a dispatcher (one it attached, or another libxdp user did), never
    beside a program attached plainly, which it would have to replace."""
    ok, why = available()
    if not ok:
        return False, why
    refusal = kernel_refusal()
    if refusal is not None:
        return False, refusal
    if running_name is not None and not running_is_dispatcher:
        return False, (f"{running_name!r} is attached without libxdp's dispatcher, and libxdp adds programs only "
                       f"to its dispatcher, never beside a plainly attached one")
    if not bpffs.is_bpffs(bpffs_dir()):
        return False, (f"libxdp keeps the dispatcher's state in a bpffs and {bpffs_dir()} is none (mount one, "
                       f"or set {BPFFS_ENV})")
    return True, "libxdp's dispatcher loads on this kernel"


@dataclass(frozen=True)
class Component:
    """One program the device's dispatcher runs."""

    name: str
    id: int
    run_prio: int


def _multiprog(ifindex: int) -> int | None:
    lib = _need()
    mp = lib.xdp_multiprog__get_from_ifindex(ifindex)
    if lib.libxdp_get_error(mp) or not mp:
        return None  # no XDP program at all (ENOENT), or one libxdp cannot read
    return mp


def has_dispatcher(ifindex: int) -> bool:
    """Does `ifindex` (this thread's namespace) run libxdp's dispatcher?"""
    if _lib is None:
        return False
    mp = _multiprog(ifindex)
    if mp is None:
        return False
    try:
        return not _lib.xdp_multiprog__is_legacy(mp)
    finally:
        _lib.xdp_multiprog__close(mp)


def components(ifindex: int) -> list[Component]:
    """The programs the dispatcher on `ifindex` runs, in order; [] when it runs none (or no dispatcher)."""
    lib = _need()
    mp = _multiprog(ifindex)
    if mp is None:
        return []
    try:
        if lib.xdp_multiprog__is_legacy(mp):
            return []
        out, prog = [], lib.xdp_multiprog__next_prog(None, mp)
        while prog:
            out.append(Component(lib.xdp_program__name(prog).decode(), lib.xdp_program__id(prog),
                                 lib.xdp_program__run_prio(prog)))
            prog = lib.xdp_multiprog__next_prog(prog, mp)
        return out
    finally:
        lib.xdp_multiprog__close(mp)


class XdpComponent:
    """One program attached through the dispatcher; detach() (or close()) removes it again."""

    def __init__(self, prog: int, obj: libbpf.BpfObject | None, ifindex: int, mode: AttachMode) -> None:
        self._prog, self._obj, self.ifindex, self.mode = prog, obj, ifindex, mode

    @classmethod
    def attach_object(cls, object_path: str, ifindex: int, mode: str = "native",
                      reuse_maps: Mapping[str, int] | None = None, run_prio: int | None = None) -> XdpComponent:
        """Attach the `SEC("xdp")` program of `object_path` to `ifindex` through the dispatcher (created
        or extended by libxdp), its maps the given fds (name -> fd) where given."""
        lib = _need()
        check_bpffs()
        obj = libbpf.BpfObject(object_path)
        try:
            for name, fd in (reuse_maps or {}).items():
                obj.map(name).reuse_fd(fd)
            prog = _ptr(lib.xdp_program__from_bpf_obj(obj._ptr, SECTION), f"libxdp: {object_path}")
        except BaseException:
            obj.close()
            raise
        try:
            if run_prio is not None:
                lib.xdp_program__set_run_prio(prog, run_prio)
            err = lib.xdp_program__attach(prog, ifindex, _MODES[mode], 0)
            if err:
                raise DispatcherError(-err, f"libxdp could not attach {os.path.basename(object_path)} to ifindex "
                                            f"{ifindex} through its dispatcher: {_strerror(err)}")
        except BaseException:
            lib.xdp_program__close(prog)
            obj.close()
            raise
        component = cls(prog, obj, ifindex, _MODES[mode])
        if not has_dispatcher(ifindex):
            # libxdp falls back to a plain attach when the kernel refuses its dispatcher (its compatibility
            # check; measured here: kernel 6.18 answers EPERM to the component's EXT load): that is not what
            # was asked, and the next program would find the hook taken. Undo it and say so.
            component.detach()
            raise DispatcherError(errno.EOPNOTSUPP, (
                f"this kernel refused libxdp's dispatcher on ifindex {ifindex} (libxdp's log above says why: "
                f"'Compatibility check for dispatcher program failed'); libxdp fell back to a plain attach, "
                f"undone: attach without the dispatcher"))
        return component

    @property
    def id(self) -> int:
        return _need().xdp_program__id(self._prog) if self._prog else 0

    def detach(self) -> None:
        """Remove this program from the dispatcher (libxdp rebuilds it around the others, or removes it
        when this was the last); then release it."""
        if self._prog is None:
            return
        err = _need().xdp_program__detach(self._prog, self.ifindex, self.mode, 0)
        self.close()
        if err and -err != errno.ENODEV:  # the device is gone: nothing to detach from
            raise DispatcherError(-err, f"libxdp could not detach from ifindex {self.ifindex}: {_strerror(err)}")

    def close(self) -> None:
        """Release without detaching (libxdp's pinned link keeps the program running)."""
        if self._prog is not None:
            _need().xdp_program__close(self._prog)
            self._prog = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None
