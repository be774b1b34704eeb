"""`rusty-rail bench [--out DIR]`: every benchmark, then DIR/BENCHMARKS.md with its plots in DIR/bench/.

    rusty-rail bench --out docs          # what `make bench` runs: docs/BENCHMARKS.md, docs/bench/*.png
    rusty-rail bench --quick --out /tmp/b --only maglev,e2e
    rusty-rail bench --out docs --only xdp,rates --previous docs/bench/results.json   # refresh two sections

Sections: maglev (balance and disruption, the paper's terms), build (table build against C), xdp (per-path
cost against the baseline), rates (delivered/offered against offered rate, both engines), e2e (real
tools through the lab against the direct path, HAProxy and nftables). The last line printed is a JSON
object of every figure (report.headline). A section that fails is reported in the file and the exit
status is 1; the others still run. --previous: the sections not run now come from an earlier run's
results.json, and the report names them with that run's date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SECTIONS = ("maglev", "build", "xdp", "rates", "e2e")
RATES = (50_000, 100_000, 200_000, 300_000)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _machine(command: str) -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor() or "unknown CPU")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    return {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "kernel": platform.release(), "cpu": cpu, "nproc": os.cpu_count(), "load_start": os.getloadavg()[0]}


def _runners(args: argparse.Namespace) -> dict[str, tuple[str, Callable[[], dict[str, Any]]]]:
    """section -> (its key in the results, the function that measures it)."""
    from . import maglev_build, maglev_paper, scripts

    def e2e() -> dict[str, Any]:
        from . import e2e as _e2e
        from .peers import missing_tools

        missing = missing_tools()
        if missing:
            raise scripts.Unavailable(f"install the Debian packages {' '.join(missing)} (make bench does)")
        settings = _e2e.Settings(rounds=args.rounds, seconds=args.seconds, log=_log)
        if args.quick:
            settings.wire_tests = ("upload",)
        return _e2e.run(settings)

    quick = args.quick
    return {
        "maglev": ("maglev_paper", lambda: maglev_paper.run(counts=(10, 100, 1000) if quick else maglev_paper.BACKEND_COUNTS)),
        "build": ("maglev_build", lambda: maglev_build.run(7)),
        "xdp": ("xdp_costs", lambda: scripts.xdp_costs(_log, 100_000 if quick else 1_000_000, 2 if quick else 5)),
        "rates": ("engine_rates", lambda: scripts.engine_rates(_log, (100_000, 200_000) if quick else RATES,
                                                               2 if quick else 5, 200_000 if quick else 1_000_000,
                                                               1 if quick else 3)),
        "e2e": ("e2e", e2e),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rusty-rail bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-report", help="directory for BENCHMARKS.md and bench/*.png (default ./bench-report)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma-separated: {', '.join(SECTIONS)}")
    p.add_argument("--rounds", type=int, default=5, help="end-to-end rounds (medians; default 5)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per end-to-end test (default 5)")
    p.add_argument("--quick", action="store_true", help="short runs to check the command works: not figures")
    p.add_argument("--previous", help="results.json of an earlier run: the sections not run now are taken from it")
    args = p.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    if os.geteuid() != 0 and set(sections) & {"xdp", "rates", "e2e"}:
        print("rusty-rail bench: xdp, rates and e2e need root (namespaces, BPF); run as root or --only maglev,build",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    machine = _machine("rusty-rail bench " + " ".join(argv if argv is not None else sys.argv[2:]))
    runners = _runners(args)
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    if args.previous:
        # Read before anything is written: --previous may be the very file this run replaces.
        earlier = json.loads(Path(args.previous).read_text(), object_hook=_int_keys)
        run_now = {runners[section][0] for section in sections}
        results = {key: value for key, value in earlier["results"].items() if key not in run_now}
        machine["carried"] = {"sections": sorted(results), "date": earlier["machine"]["date"],
                              "commit": earlier["machine"]["commit"]}
    for section in sections:
        key, measure = runners[section]
        started = time.monotonic()
        _log(f"bench: {section} ...")
        try:
            results[key] = measure()
        except Exception as exc:  # one broken section must not lose the others' figures
            failures[section] = f"{type(exc).__name__}: {exc}"
            _log(traceback.format_exc())
        _log(f"bench: {section} {'failed' if section in failures else 'done'} in {time.monotonic() - started:.0f} s")
    machine["load_end"] = os.getloadavg()[0]
    plots = _plots(results, out)
    from .report import headline, markdown

    text = markdown(results, machine, plots)
    if failures:
        text += "\n## Sections that did not run\n\n" + "\n".join(f"- {s}: {why}" for s, why in failures.items()) + "\n"
    (out / "BENCHMARKS.md").write_text(text)
    (out / "bench" / "results.json").write_text(json.dumps({"machine": machine, "results": results,
                                                            "failures": failures}, indent=1, default=str) + "\n")
    _log(f"bench: wrote {out / 'BENCHMARKS.md'} and {len(plots)} plots in {out / 'bench'}")
    print(json.dumps({"machine": machine, "figures": headline(results), "failures": failures}, default=str))
    return 1 if failures else 0


def _int_keys(obj: dict[str, Any]) -> dict[Any, Any]:
    """JSON turned the results' integer keys (table sizes, backend counts, percentages) into strings: back."""
    return {int(k) if k.isdigit() else k: v for k, v in obj.items()}


def _plots(results: dict[str, Any], out: Path) -> dict[str, str]:
    """name -> path relative to `out` of each plot drawn (for the Markdown links)."""
    from . import plots

    todo = [("maglev_balance", "maglev_paper", plots.maglev_balance),
            ("maglev_disruption", "maglev_paper", plots.maglev_disruption),
            ("maglev_build", "maglev_build", plots.maglev_build), ("xdp_costs", "xdp_costs", plots.xdp_costs),
            ("engine_rates", "engine_rates", plots.engine_rates)]
    drawn = {}
    for name, key, draw in todo:
        if key in results:
            draw(results[key], out / "bench" / f"{name}.png")
            drawn[name] = f"bench/{name}.png"
    if "e2e" in results:
        plots.e2e(results["e2e"]["summary"], out / "bench" / "e2e.png")
        drawn["e2e"] = "bench/e2e.png"
    return drawn


if __name__ == "__main__":
    sys.exit(main())
