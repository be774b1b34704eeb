"""A small ctypes binding to libbpf.so.1 (Debian `libbpf1`, 1.1): objects, maps, programs, XDP, test runs.

Generic on purpose: nothing here knows Rusty Rail's maps. Errors become `LibbpfError` (an OSError with
the errno libbpf reports). libbpf 1.x returns NULL/negative errno and sets errno, so every call goes
through `_check` or `_check_ptr`.

"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
from collections.abc import Iterator, Sequence

__all__ = [
    "LibbpfError",
    "BpfObject",
    "BpfProgram",
    "BpfMap",
    "TestRunOpts",
    "lib",
    "num_possible_cpus",
    "obj_get",
    "obj_pin",
    "map_lookup",
    "map_update",
    "map_delete",
    "map_next_key",
    "map_update_batch",
    "prog_test_run",
    "xdp_attach",
    "xdp_detach",
    "xdp_query_id",
    "prog_load",
    "prog_get_fd_by_id",
    "prog_id",
    "map_info",
    "XDP_PASS_INSNS",
    "BPF_PROG_TYPE_XDP",
    "BPF_ANY",
    "BPF_NOEXIST",
    "BPF_EXIST",
    "XDP_FLAGS_UPDATE_IF_NOEXIST",
    "XDP_FLAGS_SKB_MODE",
    "XDP_FLAGS_DRV_MODE",
    "XDP_FLAGS_HW_MODE",
    "XDP_FLAGS_REPLACE",
]

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4

_c_void_p = ctypes.c_void_p
_c_int = ctypes.c_int
_c_uint32 = ctypes.c_uint32
_c_size_t = ctypes.c_size_t
_c_char_p = ctypes.c_char_p


class LibbpfError(OSError):
    pass


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.1 bpf.h)."""

    __test__ = False  # not a pytest class
    _fields_ = [
        ("sz", _c_size_t),
        ("data_in", _c_void_p),
        ("data_out", _c_void_p),
        ("data_size_in", _c_uint32),
        ("data_size_out", _c_uint32),
        ("ctx_in", _c_void_p),
        ("ctx_out", _c_void_p),
        ("ctx_size_in", _c_uint32),
        ("ctx_size_out", _c_uint32),
        ("retval", _c_uint32),
        ("repeat", _c_int),
        ("duration", _c_uint32),
        ("flags", _c_uint32),
        ("cpu", _c_uint32),
        ("batch_size", _c_uint32),
    ]


class MapBatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts."""

    _fields_ = [("sz", _c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class XdpAttachOpts(ctypes.Structure):
    """struct bpf_xdp_attach_opts."""

    _fields_ = [("sz", _c_size_t), ("old_prog_fd", _c_int)]


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    signatures = {
        "bpf_object__open_file": (_c_void_p, [_c_char_p, _c_void_p]),
        "bpf_object__load": (_c_int, [_c_void_p]),
        "bpf_object__close": (None, [_c_void_p]),
        "bpf_object__find_map_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
        "bpf_object__find_program_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
        "bpf_map__set_max_entries": (_c_int, [_c_void_p, _c_uint32]),
        "bpf_map__max_entries": (_c_uint32, [_c_void_p]),
        "bpf_map__fd": (_c_int, [_c_void_p]),
        "bpf_map__key_size": (_c_uint32, [_c_void_p]),
        "bpf_map__value_size": (_c_uint32, [_c_void_p]),
        "bpf_map__pin": (_c_int, [_c_void_p, _c_char_p]),
        "bpf_map__unpin": (_c_int, [_c_void_p, _c_char_p]),
        "bpf_map__set_pin_path": (_c_int, [_c_void_p, _c_char_p]),
        "bpf_map__reuse_fd": (_c_int, [_c_void_p, _c_int]),
        "bpf_prog_get_fd_by_id": (_c_int, [_c_uint32]),
        "bpf_obj_get_info_by_fd": (_c_int, [_c_int, _c_void_p, ctypes.POINTER(_c_uint32)]),
        "bpf_program__fd": (_c_int, [_c_void_p]),
        "bpf_program__set_log_level": (_c_int, [_c_void_p, _c_uint32]),
        "bpf_program__set_log_buf": (_c_int, [_c_void_p, _c_char_p, _c_size_t]),
        "bpf_obj_get": (_c_int, [_c_char_p]),
        "bpf_obj_pin": (_c_int, [_c_int, _c_char_p]),
        "bpf_map_lookup_elem": (_c_int, [_c_int, _c_void_p, _c_void_p]),
        "bpf_map_update_elem": (_c_int, [_c_int, _c_void_p, _c_void_p, ctypes.c_uint64]),
        "bpf_map_delete_elem": (_c_int, [_c_int, _c_void_p]),
        "bpf_map_get_next_key": (_c_int, [_c_int, _c_void_p, _c_void_p]),
        "bpf_map_update_batch": (
            _c_int,
            [_c_int, _c_void_p, _c_void_p, ctypes.POINTER(_c_uint32), ctypes.POINTER(MapBatchOpts)],
        ),
        "bpf_map_lookup_batch": (
            _c_int,
            [_c_int, _c_void_p, _c_void_p, _c_void_p, _c_void_p, ctypes.POINTER(_c_uint32), ctypes.POINTER(MapBatchOpts)],
        ),
        "bpf_prog_test_run_opts": (_c_int, [_c_int, ctypes.POINTER(TestRunOpts)]),
        "bpf_xdp_attach": (_c_int, [_c_int, _c_int, _c_uint32, ctypes.POINTER(XdpAttachOpts)]),
        "bpf_xdp_detach": (_c_int, [_c_int, _c_uint32, ctypes.POINTER(XdpAttachOpts)]),
        "bpf_xdp_query_id": (_c_int, [_c_int, _c_int, ctypes.POINTER(_c_uint32)]),
        "libbpf_num_possible_cpus": (_c_int, []),
        "bpf_prog_load": (_c_int, [_c_int, _c_char_p, _c_char_p, _c_void_p, _c_size_t, _c_void_p]),
    }
    for fname, (restype, argtypes) in signatures.items():
        fn = getattr(lib, fname)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


lib = _load()


def _check(ret: int, what: str) -> int:
    """libbpf returns -errno (and sets errno) on failure."""
    if ret < 0:
        code = -ret if ret != -1 else (ctypes.get_errno() or _errno.EINVAL)
        raise LibbpfError(code, f"{what}: {os.strerror(code)}")
    return ret


def _check_ptr(ptr: int | None, what: str) -> int:
    if not ptr:
        code = ctypes.get_errno() or _errno.ENOENT
        raise LibbpfError(code, f"{what}: {os.strerror(code)}")
    return ptr


def num_possible_cpus() -> int:
    return _check(lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def _buf(data: bytes | bytearray | ctypes.Array | ctypes.Structure | None):
    if data is None:
        return None
    if isinstance(data, (bytes, bytearray)):
        return ctypes.create_string_buffer(bytes(data), len(data))
    return data


# -- fd-level map and object calls (work on pinned maps of another process too) -------------------


def obj_get(path: str) -> int:
    """An fd for a pinned map or program (bpffs path). The caller closes it (os.close)."""
    return _check(lib.bpf_obj_get(path.encode()), f"bpf_obj_get({path})")


def obj_pin(fd: int, path: str) -> None:
    _check(lib.bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin({path})")


def map_lookup(fd: int, key, value_size: int) -> bytes | None:
    """The value for `key` (bytes or a ctypes object), or None when absent."""
    out = ctypes.create_string_buffer(value_size)
    k = _buf(key)
    ret = lib.bpf_map_lookup_elem(fd, ctypes.byref(k), out)
    if ret < 0:
        code = -ret if ret != -1 else ctypes.get_errno()
        if code == _errno.ENOENT:
            return None
        _check(ret, "bpf_map_lookup_elem")
    return out.raw


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    k, v = _buf(key), _buf(value)
    _check(lib.bpf_map_update_elem(fd, ctypes.byref(k), ctypes.byref(v), flags), "bpf_map_update_elem")


def map_delete(fd: int, key) -> bool:
    """Delete `key`; False when it was absent."""
    k = _buf(key)
    ret = lib.bpf_map_delete_elem(fd, ctypes.byref(k))
    if ret < 0:
        code = -ret if ret != -1 else ctypes.get_errno()
        if code == _errno.ENOENT:
            return False
        _check(ret, "bpf_map_delete_elem")
    return True


def map_next_key(fd: int, key: bytes | None, key_size: int) -> bytes | None:
    """The key after `key` (the first one for None); None at the end."""
    out = ctypes.create_string_buffer(key_size)
    k = None if key is None else ctypes.byref(_buf(key))
    ret = lib.bpf_map_get_next_key(fd, k, out)
    if ret < 0:
        code = -ret if ret != -1 else ctypes.get_errno()
        if code == _errno.ENOENT:
            return None
        _check(ret, "bpf_map_get_next_key")
    return out.raw


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys: list[bytes] = []
    key = map_next_key(fd, None, key_size)
    while key is not None:
        keys.append(key)
        key = map_next_key(fd, key, key_size)
    return keys


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int, flags: int = BPF_ANY) -> None:
    """Update `count` elements in one syscall; `keys`/`values` are the packed arrays."""
    n = _c_uint32(count)
    opts = MapBatchOpts(sz=ctypes.sizeof(MapBatchOpts), elem_flags=flags, flags=0)
    kb = ctypes.create_string_buffer(keys, len(keys))
    vb = ctypes.create_string_buffer(values, len(values))
    _check(lib.bpf_map_update_batch(fd, kb, vb, ctypes.byref(n), ctypes.byref(opts)), "bpf_map_update_batch")
    if n.value != count:
        raise LibbpfError(_errno.EIO, f"bpf_map_update_batch: {n.value} of {count} written")


def map_lookup_batches(fd: int, key_size: int, value_size: int, chunk: int = 4096) -> Iterator[tuple[int, bytes, bytes]]:
    """Walk a hash map with BPF_MAP_LOOKUP_BATCH: yields (count, packed keys, packed values) per chunk of
    at most `chunk` elements. A hash
    map's batch token is a bucket number; a bucket holding more than `chunk` elements (ENOSPC) doubles
    the chunk. Entries added or removed during the walk may or may not be seen; none is seen twice."""
    opts = MapBatchOpts(sz=ctypes.sizeof(MapBatchOpts), elem_flags=0, flags=0)
    token_in = ctypes.create_string_buffer(max(key_size, 8))
    token_out = ctypes.create_string_buffer(max(key_size, 8))
    first = True
    keys = ctypes.create_string_buffer(key_size * chunk)
    values = ctypes.create_string_buffer(value_size * chunk)
    while True:
        n = _c_uint32(chunk)
        ret = lib.bpf_map_lookup_batch(fd, None if first else token_in, token_out, keys, values,
                                       ctypes.byref(n), ctypes.byref(opts))
        code = 0
        if ret < 0:
            code = -ret if ret != -1 else ctypes.get_errno()
            if code == _errno.ENOSPC and n.value == 0:
                chunk *= 2
                keys = ctypes.create_string_buffer(key_size * chunk)
                values = ctypes.create_string_buffer(value_size * chunk)
                continue
            if code != _errno.ENOENT:
                _check(ret, "bpf_map_lookup_batch")
        if n.value:
            yield n.value, keys.raw[: key_size * n.value], values.raw[: value_size * n.value]
        if code == _errno.ENOENT:
            return
        ctypes.memmove(token_in, token_out, len(token_out))
        first = False


def prog_test_run(
    prog_fd: int, data: bytes, repeat: int = 1, data_out_size: int | None = None, ctx: bytes | None = None
) -> tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN: (program return value, output data, average duration in ns)."""
    size_out = data_out_size if data_out_size is not None else len(data) + 512
    data_in = ctypes.create_string_buffer(bytes(data), len(data))
    data_out = ctypes.create_string_buffer(size_out)
    opts = TestRunOpts(
        sz=ctypes.sizeof(TestRunOpts),
        data_in=ctypes.cast(data_in, _c_void_p),
        data_out=ctypes.cast(data_out, _c_void_p),
        data_size_in=len(data),
        data_size_out=size_out,
        repeat=repeat,
    )
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
        opts.ctx_in = ctypes.cast(ctx_in, _c_void_p)
        opts.ctx_size_in = len(ctx)
    _check(lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "bpf_prog_test_run_opts")
    return opts.retval, data_out.raw[: opts.data_size_out], opts.duration


BPF_PROG_TYPE_XDP = 6


def prog_load(prog_type: int, insns: bytes, license: str = "GPL", name: str = "") -> int:
    """Load raw instructions (8 bytes each); returns the program fd (the caller closes it).
    For tiny fixed programs, e.g. an XDP_PASS one for a veth peer (XDP_TX on veth needs it)."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    ret = lib.bpf_prog_load(prog_type, name.encode() or None, license.encode(), buf, len(insns) // 8, None)
    return _check(ret, "bpf_prog_load")


# r0 = XDP_PASS (2); exit
XDP_PASS_INSNS = bytes.fromhex("b700000002000000" "9500000000000000")


def xdp_attach(ifindex: int, prog_fd: int, flags: int = 0, old_prog_fd: int | None = None) -> None:
    """Attach `prog_fd`. With `old_prog_fd`: atomically replace that program (XDP_FLAGS_REPLACE; the
    kernel refuses with EEXIST if another program is attached), so the device is never without one."""
    opts = None
    if old_prog_fd is not None:
        opts = ctypes.byref(XdpAttachOpts(sz=ctypes.sizeof(XdpAttachOpts), old_prog_fd=old_prog_fd))
        flags |= XDP_FLAGS_REPLACE
    _check(lib.bpf_xdp_attach(ifindex, prog_fd, flags, opts), f"bpf_xdp_attach(ifindex {ifindex})")


def prog_get_fd_by_id(prog_id: int) -> int:
    """An fd for the loaded program with this id (e.g. the one xdp_query_id names). The caller closes it."""
    return _check(lib.bpf_prog_get_fd_by_id(prog_id), f"bpf_prog_get_fd_by_id({prog_id})")


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (the kernel fills as much as info_len asks for)."""

    _fields_ = [("type", _c_uint32), ("id", _c_uint32), ("key_size", _c_uint32), ("value_size", _c_uint32),
                ("max_entries", _c_uint32), ("map_flags", _c_uint32), ("name", ctypes.c_char * 16)]


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info."""

    _fields_ = [("type", _c_uint32), ("id", _c_uint32)]


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    n = _c_uint32(ctypes.sizeof(info))
    _check(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)), "bpf_obj_get_info_by_fd")
    return info


def prog_id(fd: int) -> int:
    info = ProgInfo()
    n = _c_uint32(ctypes.sizeof(info))
    _check(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)), "bpf_obj_get_info_by_fd")
    return info.id


def xdp_detach(ifindex: int, flags: int = 0) -> None:
    _check(lib.bpf_xdp_detach(ifindex, flags, None), f"bpf_xdp_detach(ifindex {ifindex})")


def xdp_query_id(ifindex: int, flags: int = 0) -> int:
    """The id of the XDP program attached in the mode `flags` selects (0: any); 0 when none."""
    prog_id = _c_uint32(0)
    _check(lib.bpf_xdp_query_id(ifindex, flags, ctypes.byref(prog_id)), f"bpf_xdp_query_id(ifindex {ifindex})")
    return prog_id.value


# -- object-level wrappers -------------------------------------------------------------------------


class BpfMap:
    def __init__(self, obj: BpfObject, ptr: int, name: str) -> None:
        self._obj = obj
        self._ptr = ptr
        self.name = name

    def set_max_entries(self, n: int) -> None:
        """Only before BpfObject.load()."""
        _check(lib.bpf_map__set_max_entries(self._ptr, n), f"bpf_map__set_max_entries({self.name})")

    @property
    def max_entries(self) -> int:
        return lib.bpf_map__max_entries(self._ptr)

    @property
    def key_size(self) -> int:
        return lib.bpf_map__key_size(self._ptr)

    @property
    def value_size(self) -> int:
        return lib.bpf_map__value_size(self._ptr)

    @property
    def fd(self) -> int:
        return _check(lib.bpf_map__fd(self._ptr), f"bpf_map__fd({self.name})")

    def reuse_fd(self, fd: int) -> None:
        """Before BpfObject.load(): use the existing map `fd` (e.g. a pinned one) instead of creating
        this map. libbpf dups the fd and takes the map's definition (sizes, max_entries) from it."""
        _check(lib.bpf_map__reuse_fd(self._ptr, fd), f"bpf_map__reuse_fd({self.name})")

    def pin(self, path: str) -> None:
        _check(lib.bpf_map__pin(self._ptr, path.encode()), f"bpf_map__pin({path})")

    def unpin(self, path: str) -> None:
        _check(lib.bpf_map__unpin(self._ptr, path.encode()), f"bpf_map__unpin({path})")


class BpfProgram:
    def __init__(self, obj: BpfObject, ptr: int, name: str) -> None:
        self._obj = obj
        self._ptr = ptr
        self.name = name
        self._log: ctypes.Array | None = None

    def capture_log(self, size: int = 1 << 22, level: int = 1) -> None:
        """Keep the verifier log of the load (call before load; read `.log` after)."""
        self._log = ctypes.create_string_buffer(size)
        _check(lib.bpf_program__set_log_buf(self._ptr, self._log, size), "bpf_program__set_log_buf")
        _check(lib.bpf_program__set_log_level(self._ptr, level), "bpf_program__set_log_level")

    @property
    def log(self) -> str:
        return self._log.value.decode(errors="replace") if self._log is not None else ""

    @property
    def fd(self) -> int:
        return _check(lib.bpf_program__fd(self._ptr), f"bpf_program__fd({self.name})")


class BpfObject:
    """An opened (then loaded) BPF object file. Close it, or use it as a context manager."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ptr: int | None = _check_ptr(lib.bpf_object__open_file(path.encode(), None), f"open {path}")
        self.loaded = False

    def map(self, name: str) -> BpfMap:
        return BpfMap(self, _check_ptr(lib.bpf_object__find_map_by_name(self._ptr, name.encode()), f"map {name}"), name)

    def program(self, name: str) -> BpfProgram:
        ptr = lib.bpf_object__find_program_by_name(self._ptr, name.encode())
        return BpfProgram(self, _check_ptr(ptr, f"program {name}"), name)

    def load(self) -> None:
        _check(lib.bpf_object__load(self._ptr), f"bpf_object__load({self.path})")
        self.loaded = True

    def close(self) -> None:
        if self._ptr:
            lib.bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def pack_u32s(values: Sequence[int]) -> bytes:
    """Native-endian u32 array, e.g. the keys or values of an ARRAY map of __u32."""
    return bytes((ctypes.c_uint32 * len(values))(*values))


# libbpf's own names, for callers that think in them (fd-level; keys and values as bytes or ctypes).
bpf_obj_get = obj_get
bpf_obj_pin = obj_pin
bpf_map_lookup_elem = map_lookup
bpf_map_update_elem = map_update
bpf_map_delete_elem = map_delete
bpf_map_get_next_key = map_next_key
