"""Maglev table build: rusty_rail.core.maglev (numpy) against a C -O2 build of the same pseudocode.

    .venv/bin/python bench/maglev_build.py [--repeats 7]     (or python -m rusty_rail.bench.maglev_build)

The reference is the paper's Pseudocode 1 (Eisenbud et al., NSDI 2016, section 3.4) transcribed into
C, written to a temporary directory, compiled with `gcc -O2` at run time and called through ctypes.
Both sides get the same offset and skip arrays (rusty_rail's keyed BLAKE2b, computed once in Python),
so only the fill is compared; the hash cost is reported on its own. Per case: median and minimum of
`repeats` runs of each (C and numpy interleaved, so both see the same machine load), the ratio of
the medians in wall-clock and in CPU time (steadier when other work shares the machine), and a check
that the two tables are identical. Then a full build_table() with a cold hash cache against a
rebuild after one backend joins or leaves (warm cache: one hash at most).

Prints one line per figure and a final JSON line; `run(repeats) -> dict` is the same for
`rusty-rail bench`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import numpy as np

from ..core import maglev

CASES = ((65537, 1000), (655373, 1000), (655373, 100))
"""(table size M, backends N); the first is the headline figure."""

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>

/* Pseudocode 1, literally: permutation[i][j] = (offset[i] + j * skip[i]) mod M, next[i] counts j. */
int populate(int n, int64_t m, const int64_t *offset, const int64_t *skip, int32_t *entry) {
    int64_t *next = calloc((size_t)n, sizeof *next);
    if (!next) return -1;
    for (int64_t s = 0; s < m; s++) entry[s] = -1;
    int64_t filled = 0;
    for (;;) {
        for (int i = 0; i < n; i++) {
            int64_t c = (offset[i] + next[i] * skip[i]) % m;
            while (entry[c] >= 0) {
                next[i]++;
                c = (offset[i] + next[i] * skip[i]) % m;
            }
            entry[c] = i;
            next[i]++;
            filled++;
            if (filled == m) {
                free(next);
                return 0;
            }
        }
    }
}
"""


def compile_reference(directory: Path) -> ctypes.CDLL:
    source, library = directory / "maglev_ref.c", directory / "maglev_ref.so"
    source.write_text(C_SOURCE)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.populate.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.populate.restype = ctypes.c_int
    return lib


def c_fill(lib: ctypes.CDLL, offset: np.ndarray, skip: np.ndarray, size: int) -> np.ndarray:
    entry = np.empty(size, np.int32)
    if lib.populate(len(offset), size, offset.ctypes.data, skip.ctypes.data, entry.ctypes.data):
        raise MemoryError("the C reference could not allocate")
    return entry


def addresses(n: int, first: str = "10.64.0.1") -> list[IPv4Address]:
    return [IPv4Address(int(IPv4Address(first)) + i) for i in range(n)]


def seconds(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall-clock and CPU time of one call: on a shared machine the CPU time is the steadier one."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    wall, cpu = [w for w, _ in samples], [c for _, c in samples]
    return {"median_ms": statistics.median(wall) * 1e3, "min_ms": min(wall) * 1e3,
            "cpu_median_ms": statistics.median(cpu) * 1e3}


def hashes(backends: list[IPv4Address], size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """offset and skip arrays, and what computing them cost with a cold cache."""
    maglev.permutation_params.cache_clear()
    start = time.perf_counter()
    params = [maglev.permutation_params(b, size) for b in backends]
    elapsed = time.perf_counter() - start
    array = np.array(params, np.int64)
    return np.ascontiguousarray(array[:, 0]), np.ascontiguousarray(array[:, 1]), elapsed


def fill_case(lib: ctypes.CDLL, size: int, n: int, repeats: int) -> dict:
    backends = addresses(n)
    offset, skip, hash_s = hashes(backends, size)
    weights = np.ones(n, np.int64)
    c_times, np_times = [], []
    for _ in range(repeats):
        c_times.append(seconds(lambda: c_fill(lib, offset, skip, size)))
        np_times.append(seconds(lambda: maglev._fill(offset, skip, weights, size)))
    same = bool(np.array_equal(c_fill(lib, offset, skip, size), maglev._fill(offset, skip, weights, size)))
    c, ours = summary(c_times), summary(np_times)
    return {"size": size, "backends": n, "identical": same, "c": c, "numpy": ours,
            "ratio_median": ours["median_ms"] / c["median_ms"], "ratio_min": ours["min_ms"] / c["min_ms"],
            "ratio_cpu_median": ours["cpu_median_ms"] / c["cpu_median_ms"], "hash_ms": hash_s * 1e3}


def rebuild_case(size: int, n: int, repeats: int) -> dict:
    """Full build_table() from a cold hash cache, and rebuilds after one backend joins or leaves."""
    backends = addresses(n)
    spare = addresses(repeats, first="10.65.0.1")  # a different newcomer each time: one real hash each
    full, join, leave = [], [], []
    for i in range(repeats):
        maglev.permutation_params.cache_clear()
        full.append(seconds(lambda: maglev.build_table(backends, size)))
        join.append(seconds(lambda: maglev.build_table([*backends, spare[i]], size)))
        leave.append(seconds(lambda: maglev.build_table(backends[1:], size)))
    out = {"size": size, "backends": n, "full_cold": summary(full), "join_warm": summary(join),
           "leave_warm": summary(leave)}
    out["join_vs_full"] = out["join_warm"]["median_ms"] / out["full_cold"]["median_ms"]
    out["join_vs_full_cpu"] = out["join_warm"]["cpu_median_ms"] / out["full_cold"]["cpu_median_ms"]
    return out


def run(repeats: int = 7) -> dict:
    repeats = max(7, repeats)
    with tempfile.TemporaryDirectory(prefix="maglev-bench-") as tmp:
        lib = compile_reference(Path(tmp))
        fills = [fill_case(lib, size, n, repeats) for size, n in CASES]
    size, n = CASES[0]
    return {"benchmark": "maglev_build", "repeats": repeats, "fills": fills,
            "rebuild": rebuild_case(size, n, repeats)}


def report(result: dict) -> None:
    print(f"maglev build, medians of {result['repeats']} runs (min in brackets); C = gcc -O2 Pseudocode 1")
    print(f"{'M':>8} {'N':>5} {'C ms':>14} {'numpy ms':>16} {'ratio':>6} {'CPU ms C/numpy':>16} {'ratio':>6}"
          f" {'hash ms':>8} identical")
    for f in result["fills"]:
        c, ours = f["c"], f["numpy"]
        print(f"{f['size']:>8} {f['backends']:>5} {c['median_ms']:>7.2f} ({c['min_ms']:>5.2f})"
              f" {ours['median_ms']:>8.2f} ({ours['min_ms']:>6.2f}) {f['ratio_median']:>6.2f}"
              f" {c['cpu_median_ms']:>7.2f}/{ours['cpu_median_ms']:<8.2f} {f['ratio_cpu_median']:>6.2f}"
              f" {f['hash_ms']:>8.2f} {f['identical']}")
    r = result["rebuild"]
    for what, key in (("wall", "median_ms"), ("CPU", "cpu_median_ms")):
        print(f"build_table M={r['size']} N={r['backends']} ({what}): full, cold hash cache {r['full_cold'][key]:.2f}"
              f" ms; rebuild after one joins {r['join_warm'][key]:.2f} ms, after one leaves"
              f" {r['leave_warm'][key]:.2f} ms ({r['join_warm'][key] / r['full_cold'][key]:.2f} of full)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs per figure (at least 7)")
    args = parser.parse_args()
    result = run(args.repeats)
    report(result)
    print(json.dumps(result))
    return 0 if all(f["identical"] for f in result["fills"]) else 1


if __name__ == "__main__":
    sys.exit(main())
