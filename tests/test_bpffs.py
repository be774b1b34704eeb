"""bpf/bpffs.py: the pin root checked, bpffs mounted where missing, another mount namespace reached.

Mounting happens only inside mount namespaces these tests make (`unshare --mount --propagation
private`), so the host's mounts stay as they are; the scripts report what they saw as JSON.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rusty_rail.bpf import bpffs
from rusty_rail.core.constants import BPFFS

needs_unshare = pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                                   reason="needs root and unshare (util-linux)")


def _in_private_mounts(code: str, *args: str) -> dict:
    """Run Python `code` in a mount namespace of its own; its last line of output, as JSON."""
    script = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {' '.join(map(shlex.quote, args))}"
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


PREPARE = r"""
import json, os, subprocess, sys
from rusty_rail.bpf import bpffs
def mounts(): return [l.split()[1] for l in open("/proc/self/mounts") if l.split()[2] == "bpf"]
def attempt(path):
    try:
        bpffs.prepare(path)
        return "ok"
    except bpffs.PinRootError as exc:
        return str(exc)
tmp = sys.argv[1]
out = {}
out["fresh"] = attempt(tmp + "/fresh/pins")            # missing: made, and bpffs mounted on it
out["fresh_is_bpffs"] = bpffs.is_bpffs(tmp + "/fresh/pins")
out["again"] = attempt(tmp + "/fresh/pins/below")      # on a bpffs already: only the directory made
out["mounted"] = [m for m in mounts() if m.startswith(tmp)]
os.makedirs(tmp + "/full")
open(tmp + "/full/file", "w").close()
out["full"] = attempt(tmp + "/full")                   # a directory with something in it
out["file"] = attempt(tmp + "/full/file/pins")         # below a file
os.makedirs(tmp + "/ro")
subprocess.run(["mount", "-t", "bpf", "-o", "ro", "bpf", tmp + "/ro"], check=True)
out["read_only"] = attempt(tmp + "/ro")
subprocess.run(["umount", "-R", "/sys"], check=True)   # as `ip netns exec` leaves it: a fresh sysfs
subprocess.run(["mount", "-t", "sysfs", "sysfs", "/sys"], check=True)
out["sys_before"] = bpffs.is_bpffs("/sys/fs/bpf")
out["sys"] = attempt("/sys/fs/bpf/rusty_rail")         # bpffs mounted on /sys/fs/bpf, not below
out["sys_after"] = bpffs.is_bpffs("/sys/fs/bpf") and os.path.isdir("/sys/fs/bpf/rusty_rail")
print(json.dumps(out))
"""


@needs_unshare
def test_prepare_mounts_where_missing_and_refuses_what_it_must_not_touch(tmp_path: Path) -> None:
    out = _in_private_mounts(PREPARE, str(tmp_path))
    assert out["fresh"] == "ok" and out["fresh_is_bpffs"]
    assert out["again"] == "ok"
    assert out["mounted"] == [str(tmp_path / "fresh" / "pins")]  # once
    assert "not empty" in out["full"] and "not mounted over files" in out["full"]
    assert "is not a directory" in out["file"]
    assert "cannot write" in out["read_only"]
    assert out["sys_before"] is False and out["sys"] == "ok" and out["sys_after"] is True
    assert os.listdir(tmp_path / "fresh" / "pins") == []  # the host never saw the mount
    assert (tmp_path / "full" / "file").exists()


def test_prepare_refuses_a_relative_path() -> None:
    with pytest.raises(bpffs.PinRootError, match="not an absolute path"):
        bpffs.prepare("relative/pins")


@pytest.mark.skipif(not bpffs.is_bpffs(BPFFS), reason="the host has no bpffs at /sys/fs/bpf")
def test_is_bpffs_and_fs_type() -> None:
    assert bpffs.fs_type(BPFFS) == bpffs.BPF_FS_MAGIC
    assert not bpffs.is_bpffs("/proc") and not bpffs.is_bpffs("/no/such/path")
    with pytest.raises(OSError):
        bpffs.fs_type("/no/such/path")


# Mounts its own bpffs on argv[1], prints that directory's identity, then waits for stdin to close.
HOLDER = r"""
import json, os, sys
from rusty_rail.bpf import bpffs
bpffs.prepare(sys.argv[1])
print(json.dumps(list(bpffs.identity(sys.argv[1]))), flush=True)
sys.stdin.read()
"""


@needs_unshare
def test_reach_and_sees_across_mount_namespaces(tmp_path: Path) -> None:
    root = str(tmp_path / "pins")
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", HOLDER, root],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        theirs = tuple(json.loads(holder.stdout.readline()))
        # `unshare` execs the interpreter: the pid is the holder's. Here, root is a plain directory.
        assert bpffs.identity(root) != theirs
        assert not bpffs.sees(holder.pid, root) and bpffs.sees(os.getpid(), root)
        path = bpffs.reach(root, theirs, holder.pid)
        assert path == f"/proc/{holder.pid}/root{root}" and bpffs.is_bpffs(path)
        (Path(path) / "made-from-outside").mkdir()  # lands in the holder's bpffs, not here
        assert not (tmp_path / "pins" / "made-from-outside").exists()
        assert bpffs.reach(root, bpffs.identity(root), os.getpid()) == root  # one view: the path itself
        with pytest.raises(bpffs.PinRootError, match="cannot reach"):
            bpffs.reach(root, (theirs[0], theirs[1] + 12345), holder.pid)
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(10)
