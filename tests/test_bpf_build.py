"""bpf/build.py: the one place the clang flags live, what `make bpf` runs, and on-demand compiles."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rusty_rail.bpf import build

REPO = Path(__file__).resolve().parent.parent
needs_clang = pytest.mark.skipif(shutil.which(build.CLANG) is None, reason="needs clang")

PASS_C = """#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "extra.h"

SEC("xdp")
int t_pass(struct xdp_md *ctx)
{
	return VERDICT;
}

char LICENSE[] SEC("license") = "GPL";
"""
EM_BPF = 247


def _is_bpf_object(path: Path) -> bool:
    head = path.read_bytes()[:20]
    return head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == EM_BPF


@pytest.fixture
def srcdir(tmp_path: Path) -> Path:
    (tmp_path / "t_pass.c").write_text(PASS_C)
    (tmp_path / "extra.h").write_text("#define VERDICT XDP_PASS\n")
    return tmp_path


def test_the_flags_are_written_once() -> None:
    """No other file of the project spells out a BPF compile: the Makefile, the lab and the tests go
    through build.py."""
    flag_patterns = [re.compile(r"-target[\"',\s]+bpf"), re.compile(r"-O2[\"',\s]+-g[\"',\s]+-Wall")]
    paths = [REPO / "Makefile", *(REPO / "src").rglob("*.py"), *(REPO / "tests").rglob("*.py"),
             *(REPO / "bench").rglob("*.py")]
    spelled = [str(p.relative_to(REPO)) for p in paths
               if p.resolve() not in (Path(build.__file__).resolve(), Path(__file__).resolve())
               and any(pat.search(p.read_text(errors="replace")) for pat in flag_patterns)]
    assert spelled == []
    cmd = build.clang_command(Path("x.c"), Path("x.o"))
    assert cmd[0] == "clang" and cmd[-4:] == ["-c", "x.c", "-o", "x.o"]
    assert {"-O2", "-g", "-Wall", "-Werror"} <= set(cmd) and cmd[cmd.index("-target") + 1] == "bpf"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_bpf_calls_the_module() -> None:
    dry = subprocess.run(["make", "-n", "-B", "-C", str(REPO), "src/rusty_rail/bpf/xdp_pass.o"],
                         capture_output=True, text=True, check=True).stdout
    recipe = [line for line in dry.splitlines() if "rusty_rail.bpf.build" in line]
    assert recipe and recipe[0].endswith("-m rusty_rail.bpf.build --force xdp_pass")
    assert "clang" not in dry


@needs_clang
def test_object_path_compiles_when_missing_or_stale(srcdir: Path) -> None:
    obj = build.object_path("t_pass", srcdir)
    assert obj == srcdir / "t_pass.o" and _is_bpf_object(obj)
    assert not build.is_stale("t_pass", srcdir)
    built = obj.stat().st_mtime_ns
    assert build.object_path("t_pass", srcdir).stat().st_mtime_ns == built  # up to date: not rebuilt

    header = srcdir / "extra.h"
    later = obj.stat().st_mtime + 10
    os.utime(header, (later, later))  # any header counts: a program may include it
    assert build.is_stale("t_pass", srcdir)
    assert build.object_path("t_pass", srcdir).stat().st_mtime_ns != built
    assert sorted(p.name for p in srcdir.iterdir()) == ["extra.h", "t_pass.c", "t_pass.o"]  # no temporaries


@needs_clang
def test_a_compile_error_names_the_line_and_leaves_no_object(srcdir: Path) -> None:
    (srcdir / "extra.h").write_text("#define VERDICT XDP_PASS +\n")
    with pytest.raises(subprocess.CalledProcessError) as err:
        build.compile_object("t_pass", srcdir)
    assert "t_pass.c" in err.value.stderr and "error" in err.value.stderr
    assert sorted(p.name for p in srcdir.iterdir()) == ["extra.h", "t_pass.c"]


def test_installed_without_sources_uses_the_object(tmp_path: Path) -> None:
    (tmp_path / "only.o").write_bytes(b"\x7fELF")
    assert build.object_path("only", tmp_path) == tmp_path / "only.o"
    with pytest.raises(FileNotFoundError):
        build.object_path("absent", tmp_path)


@needs_clang
def test_the_module_builds_the_project_programs() -> None:
    """`python -m rusty_rail.bpf.build NAME` as make runs it: stdlib only, from the source tree."""
    r = subprocess.run([sys.executable, "-m", "rusty_rail.bpf.build", "--force", "gre_decap"],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 0, r.stderr
    assert _is_bpf_object(build.BPF_DIR / "gre_decap.o")
    bad = subprocess.run([sys.executable, "-m", "rusty_rail.bpf.build", "no_such_program"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert bad.returncode == 2 and "no such program: no_such_program" in bad.stderr
    assert set(build.sources()) >= {"gre_decap", "router_encap", "xdp_balancer", "xdp_pass"}
