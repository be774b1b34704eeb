"""A loaded program as the kernel describes it: struct bpf_prog_info (uapi/linux/bpf.h) up to its name,
read with libbpf's bpf_obj_get_info_by_fd. One definition for tc.py (a tc program's name) and
engines/xdp/hook.py (whose XDP program runs on a device, and which maps it uses)."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from . import libbpf

__all__ = ["LoadedProgram", "loaded_program"]

MAX_MAPS = 64
"""Map ids asked for; a program of ours uses a dozen."""


class _ProgInfo(ctypes.Structure):
    """struct bpf_prog_info up to its name; the kernel fills as much as info_len asks for."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16)]


@dataclass(frozen=True)
class LoadedProgram:
    id: int
    type: int
    name: str
    tag: str
    """Hex, as bpftool shows it."""
    map_ids: tuple[int, ...]


def loaded_program(fd: int) -> LoadedProgram:
    """The program behind `fd`; OSError (with the kernel's errno) when the kernel refuses to say."""
    ids = (ctypes.c_uint32 * MAX_MAPS)()
    info = _ProgInfo(nr_map_ids=MAX_MAPS, map_ids=ctypes.addressof(ids))
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = libbpf.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if ret < 0:
        code = -ret if ret != -1 else (ctypes.get_errno() or errno.EINVAL)
        raise OSError(code, f"bpf_obj_get_info_by_fd: {os.strerror(code)}")
    return LoadedProgram(info.id, info.type, info.name.decode(errors="replace"), bytes(info.tag).hex(),
                         tuple(ids[:min(info.nr_map_ids, MAX_MAPS)]))
