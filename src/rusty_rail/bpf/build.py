"""Compile the BPF C sources next to themselves: the one place the clang flags are written.

    python -m rusty_rail.bpf.build [--force] [name ...]     # default: every bpf/*.c that is stale

`make bpf` calls this (make decides what is stale, then passes --force); programs that load an object
call `object_path(name)`, which compiles it when it is missing or older than its sources, so a checkout
works without `make bpf` having run. Standard library only: make runs it before the venv exists.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BPF_DIR", "CLANG", "clang_command", "compile_object", "is_stale", "object_path", "sources", "main"]

BPF_DIR = Path(__file__).resolve().parent
CLANG = "clang"
# -g keeps BTF (libbpf needs it for the maps); -Werror because a warning in a BPF program is usually a
# verifier rejection later. The multiarch directory holds <asm/types.h>, which <linux/bpf.h> includes
# and clang's BPF target does not find on its own.
_FLAGS = ("-O2", "-g", "-Wall", "-Werror", "-target", "bpf")


def clang_command(src: Path, out: Path) -> list[str]:
    return [CLANG, *_FLAGS, f"-I/usr/include/{platform.machine()}-linux-gnu", "-c", str(src), "-o", str(out)]


def sources(directory: Path = BPF_DIR) -> list[str]:
    """The programs there are: bpf/<name>.c, by name."""
    return sorted(p.stem for p in directory.glob("*.c"))


def _inputs(name: str, directory: Path) -> list[Path]:
    # Every header counts (the programs include each other's), and so do the flags written here.
    return [directory / f"{name}.c", *directory.glob("*.h"), Path(__file__).resolve()]


def is_stale(name: str, directory: Path = BPF_DIR) -> bool:
    obj = directory / f"{name}.o"
    if not obj.exists():
        return True
    return obj.stat().st_mtime < max(p.stat().st_mtime for p in _inputs(name, directory) if p.exists())


def compile_object(name: str, directory: Path = BPF_DIR) -> Path:
    """Compile <directory>/<name>.c to <name>.o there; raises CalledProcessError with clang's
    messages in .stderr."""
    src = directory / f"{name}.c"
    if not src.exists():
        raise FileNotFoundError(src)
    obj = directory / f"{name}.o"
    # A temporary name of our own, then rename: a concurrent compile or loader never sees half an object.
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".o", dir=directory)
    os.close(fd)
    try:
        subprocess.run(clang_command(src, Path(tmp)), check=True, capture_output=True, text=True)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the object from other users
        os.replace(tmp, obj)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return obj


def object_path(name: str, directory: Path = BPF_DIR) -> Path:
    """Path of bpf/<name>.o, compiled first if missing or stale. Installed without sources: what is there."""
    obj = directory / f"{name}.o"
    if not (directory / f"{name}.c").exists():
        if obj.exists():
            return obj
        raise FileNotFoundError(directory / f"{name}.c")
    return compile_object(name, directory) if is_stale(name, directory) else obj


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rusty_rail.bpf.build", description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="compile even when the object is up to date")
    p.add_argument("names", nargs="*", help=f"programs to build (default: all of {', '.join(sources())})")
    a = p.parse_args(argv)
    unknown = sorted(set(a.names) - set(sources()))
    if unknown:
        p.error(f"no such program: {', '.join(unknown)}")
    for name in a.names or sources():
        if not (a.force or is_stale(name)):
            continue
        print(" ".join(clang_command(BPF_DIR / f"{name}.c", BPF_DIR / f"{name}.o")))
        try:
            compile_object(name)
        except subprocess.CalledProcessError as e:
            print(e.stderr, end="", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
