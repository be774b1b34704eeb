"""bpffs, the file system BPF objects are pinned in (bpf(2) BPF_OBJ_PIN): check it, mount it, reach it.

The hitless restart pins the XDP engine's maps below RR_PIN_ROOT for the next daemon. Three facts of
mount namespaces decide how (checked on Linux 6.18 with iproute2's `ip netns exec`):

- `ip netns exec` (like a container or a systemd unit with a private /sys) unshares the mount
  namespace and mounts a fresh sysfs on /sys, so /sys/fs/bpf there is an empty sysfs directory, not a
  bpffs; the host's bpffs is hidden.
- Each `mount -t bpf` makes a new, separate instance, and each `ip netns exec` its own mount
  namespace: what one such process pins, another started the same way does not see at the same path.
- A process reaches another's mount namespace through /proc/<pid>/root (root may follow that link), and
  pinning through it lands in the other process's instance.

So `prepare()` makes the pin root usable where the successor will look (mounting bpffs when nothing is
there, as Cilium and systemd do at /sys/fs/bpf), and `reach()` finds the path by which the daemon
handing over reaches that very directory (`identity()`: device and inode).
"""

from __future__ import annotations

import ctypes
import os

from rusty_rail.core.constants import BPFFS

__all__ = ["BPF_FS_MAGIC", "PinRootError", "identity", "is_bpffs", "prepare", "reach", "sees"]

BPF_FS_MAGIC = 0xCAFE4A11
"""statfs(2) f_type of a bpffs (include/uapi/linux/magic.h)."""

_libc = ctypes.CDLL(None, use_errno=True)


class PinRootError(Exception):
    """The pin root cannot hold pins; the message says why, for the operator, as is."""


class _StatFs(ctypes.Structure):
    """The head of struct statfs (bits/statfs.h): f_type is the first word; the rest is room."""

    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]


def fs_type(path: str) -> int:
    """statfs(2) f_type of the file system `path` is on (os.statvfs does not give it)."""
    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return buf.f_type & 0xFFFFFFFF


def is_bpffs(path: str) -> bool:
    try:
        return fs_type(path) == BPF_FS_MAGIC
    except OSError:
        return False


def identity(path: str) -> tuple[int, int]:
    """(st_dev, st_ino) of a directory: every bpffs instance has its own st_dev, so two processes see
    the same directory exactly when this is equal for both."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _mount_bpffs(target: str) -> None:
    # mount(2) as `mount -t bpf bpf TARGET` does it (default options), without needing mount(8).
    if _libc.mount(b"bpf", os.fsencode(target), b"bpf", ctypes.c_ulong(0), None) != 0:
        code = ctypes.get_errno()
        hint = " (mounting needs CAP_SYS_ADMIN)" if code == 1 else ""
        raise PinRootError(f"mounting bpffs on {target} failed: {os.strerror(code)}{hint}")


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def prepare(pin_root: str) -> None:
    """Make `pin_root` a directory on a bpffs that this process can write, mounting one where missing:

    - on a bpffs already (it, or its nearest existing parent): the missing directories are made;
    - below /sys/fs/bpf (the kernel's place for bpffs, an empty sysfs directory when nothing is mounted
      there, e.g. after `ip netns exec`): bpffs is mounted on /sys/fs/bpf;
    - elsewhere: bpffs is mounted on `pin_root` itself when it is an empty directory or can be made one;
      never over a directory that holds something.

    A mount made in a private mount namespace (`ip netns exec`) stays there: the host's is not touched.
    Raises PinRootError saying why it cannot be used."""
    if not os.path.isabs(pin_root):
        raise PinRootError("it is not an absolute path")
    existing = pin_root
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PinRootError(f"{existing} is not a directory")
    if not is_bpffs(existing):
        mount_point = BPFFS if _under(pin_root, BPFFS) else pin_root
        if mount_point != BPFFS:
            try:
                os.makedirs(mount_point, exist_ok=True)
            except OSError as exc:
                raise PinRootError(f"it is not on a bpffs, and {mount_point} cannot be made to mount one on: "
                                   f"{exc.strerror or exc}") from None
        elif not os.path.isdir(mount_point):
            raise PinRootError(f"it is not on a bpffs, and {BPFFS} is missing to mount one on")
        if not is_bpffs(mount_point):
            if os.listdir(mount_point):
                raise PinRootError(f"it is on {_fs_name(mount_point)}, not a bpffs, and {mount_point} is not "
                                   f"empty: bpffs is not mounted over files (mount it yourself: mount -t bpf "
                                   f"bpf {mount_point}, or choose an empty directory)")
            _mount_bpffs(mount_point)
    try:
        os.makedirs(pin_root, exist_ok=True)
    except OSError as exc:
        raise PinRootError(f"it cannot be made a directory: {exc.strerror or exc}") from None
    if not is_bpffs(pin_root):  # e.g. another file system mounted below the bpffs
        raise PinRootError(f"it is on {_fs_name(pin_root)}, not a bpffs")
    if not os.access(pin_root, os.W_OK) or os.statvfs(pin_root).f_flag & os.ST_RDONLY:
        raise PinRootError("it is a bpffs directory this process cannot write (read-only?)")


def _fs_name(path: str) -> str:
    try:
        magic = fs_type(path)
    except OSError:
        return "an unknown file system"
    names = {0x62656572: "sysfs", 0x01021994: "tmpfs", 0xEF53: "ext4", 0x9123683E: "btrfs", 0x58465342: "xfs",
             0x794C7630: "overlayfs"}  # include/uapi/linux/magic.h
    return names.get(magic, f"a file system of type 0x{magic:08x}")


def reach(path: str, wanted: tuple[int, int], pid: int) -> str:
    """A path by which this process reaches the directory process `pid` sees at `path` (known by its
    identity(), `wanted`): `path` itself when both see the same one (one mount namespace, or one bpffs
    shared by both), else through /proc/<pid>/root, the root of that process's mount namespace.
    Raises PinRootError when neither leads there."""
    candidates = [path, f"/proc/{pid}/root{path}"]
    errors = []
    for candidate in candidates:
        try:
            if identity(candidate) == wanted:
                return candidate
        except OSError as exc:
            errors.append(f"{candidate}: {exc.strerror or exc}")
            continue
        errors.append(f"{candidate} is another directory")
    raise PinRootError(f"cannot reach {path} as process {pid} sees it ({'; '.join(errors)})")


def sees(pid: int, path: str) -> bool:
    """Whether process `pid` sees at `path` the directory this process sees there."""
    try:
        return identity(f"/proc/{pid}/root{path}") == identity(path)
    except OSError:
        return False
