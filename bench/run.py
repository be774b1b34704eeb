"""`make bench`: every benchmark in sequence, each one's summary at the end.

    sudo .venv/bin/python bench/run.py [--quick] [--only xdp_test_run,afpacket_costs,engine_rates,fuzz,engine_afpacket]

- xdp_test_run.py: the XDP program's ns/packet through BPF_PROG_TEST_RUN (hit, miss) vs a baseline.
- afpacket_costs.py: the Balancer's decide() and its parts, ns/packet, no I/O (where Python time goes).
- engine_rates.py: both engines on a veth pair, trafgen random flows: delivered/offered at 100 kpps and
  at the sender's maximum, CPU us/packet, against an XDP MAC-swap baseline.
- fuzz.py: atheris over the parsers and both engines, a million inputs (no disagreement, no crash).
- veth_xdp_modes.py: native vs generic XDP vs AF_PACKET on a veth, delivery and CPU per delivered frame,
  with and without an XDP program on the peer (engine auto's choice on veth).
- engine_afpacket.py (not by default: its figures are a subset of engine_rates'): the AF_PACKET engine
  with a trivial decide() vs a plain recv/send loop, one flow.
Each writes its JSON to bench/results/. --quick: shorter runs (smoke test, not figures).
Exit status: non-zero if a benchmark failed to run (missed targets are reported, not failures).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    # name: (argv, quick argv, needs root, lines of its output that summarise it)
    "xdp_test_run": (["1000000", "5"], ["100000", "2"], True, None),
    "afpacket_costs": ([], ["50000"], False, None),
    "engine_rates": ([], ["--seconds-paced", "2", "--packets-max", "300000"], True, "engine "),
    "engine_afpacket": ([], ["200000"], True, None),
    "fuzz": (["-runs=1000000"], ["-runs=20000"], True, "fuzz: "),
    "veth_xdp_modes": ([], ["--rounds", "1", "--seconds", "1"], True, "variant "),
}
DEFAULT = ["xdp_test_run", "afpacket_costs", "engine_rates", "fuzz", "veth_xdp_modes"]


def summary(name: str, out: str, marker: str | None) -> str:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if marker:  # from the line starting with marker (the table) to the end
        for i, ln in enumerate(lines):
            if ln.startswith(marker):
                return "\n".join(lines[i:])
    return "\n".join(lines[-14:])


def main() -> int:
    p = argparse.ArgumentParser(description="run the benchmarks")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=",".join(DEFAULT))
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    root = os.geteuid() == 0
    results: dict[str, tuple[int, str, float]] = {}
    for name in names:
        argv, quick, needs_root, marker = BENCHES[name]
        if needs_root and not root:
            results[name] = (-1, "skipped: needs root", 0.0)
            continue
        print(f"=== {name} {' '.join(quick if args.quick else argv)}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), *(quick if args.quick else argv)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = []
        assert proc.stdout is not None
        for line in proc.stdout:  # live, and kept for the summary
            print(line, end="", flush=True)
            out.append(line)
        rc = proc.wait()
        results[name] = (rc, summary(name, "".join(out), marker), time.monotonic() - t0)
    print("\n=== summary")
    failed = 0
    for name, (rc, text, secs) in results.items():
        state = "skipped" if rc < 0 else ("ok" if rc == 0 else f"FAILED (exit {rc})")
        failed += rc > 0
        print(f"--- {name}: {state}, {secs:.0f} s")
        print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
