"""Find the compiled BPF objects; compile them on demand when `make bpf` has not run (or is stale)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"


def bpf_object(name: str) -> Path:
    """Path of src/rusty_rail/bpf/<name>.o, rebuilt with the Makefile's flags if older than its sources."""
    src = BPF_DIR / f"{name}.c"
    obj = BPF_DIR / f"{name}.o"
    if not src.exists():
        if obj.exists():  # installed without sources: use what is there
            return obj
        raise FileNotFoundError(src)
    newest = max(p.stat().st_mtime for p in [src, *BPF_DIR.glob("*.h")])
    if not obj.exists() or obj.stat().st_mtime < newest:
        arch_inc = f"/usr/include/{platform.machine()}-linux-gnu"
        tmp = obj.with_suffix(".o.tmp")
        subprocess.run(
            ["clang", "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-I{arch_inc}", "-c", str(src), "-o", str(tmp)],
            check=True,
        )
        tmp.replace(obj)  # atomic: a concurrent reader never sees half an object
    return obj
