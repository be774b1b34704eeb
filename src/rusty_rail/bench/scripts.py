"""The repository's packet benchmarks (bench/engine_rates.py, bench/xdp_test_run.py), run for the report.

They drive trafgen and BPF_PROG_TEST_RUN on veth pairs built by the test suite's helpers, so they need
a source checkout (an editable install, as `make venv` makes); each writes its JSON to bench/results/
and names the file on its last line ("wrote PATH"), which is what is read back here. Without the
checkout the section says so and is skipped: nothing is made up.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[3]
BENCH_DIR = REPOSITORY / "bench"
_WROTE = re.compile(r"^wrote (\S+\.json)$", re.M)


class Unavailable(RuntimeError):
    """A benchmark that cannot run here (no source checkout, not root); the message says why."""


def run_script(name: str, argv: Sequence[str], log: Callable[[str], None], timeout: float = 1800) -> dict[str, Any]:
    script = BENCH_DIR / f"{name}.py"
    if not script.exists():
        raise Unavailable(f"{script} not found: this benchmark runs from a source checkout")
    log(f"bench: {name} {' '.join(argv)}")
    done = subprocess.run([sys.executable, str(script), *argv], cwd=REPOSITORY, capture_output=True, text=True,
                          timeout=timeout)
    wrote = _WROTE.findall(done.stdout)
    if done.returncode != 0 or not wrote:
        raise RuntimeError(f"{name} failed (exit {done.returncode}): {done.stdout[-800:]}{done.stderr[-800:]}")
    return json.loads(Path(REPOSITORY / wrote[-1]).read_text())


def xdp_costs(log: Callable[[str], None], repeat: int = 1_000_000, rounds: int = 5) -> dict[str, Any]:
    """ns per packet of each XDP path (IPv4 and IPv6) and of the MAC-swap baseline, same BPF_PROG_TEST_RUN
    run; the hit paths also paired with the baseline round by round."""
    result = run_script("xdp_test_run", [str(repeat), str(rounds)], log)
    return {"ns_per_packet": result["ns_per_packet"], "ratio_to_baseline": result["ratio_to_baseline"],
            "paired_ratio_to_baseline": result.get("paired_ratio_to_baseline", {}),
            "frame_bytes": {"ipv4": result.get("frame_bytes"), "ipv6": result.get("frame6_bytes")},
            "repeat": repeat, "rounds": rounds}


def engine_rates(log: Callable[[str], None], rates: Sequence[int], seconds: float,
                 max_packets: int, family_rounds: int = 3) -> dict[str, Any]:
    """Delivered/offered of both engines against the offered rate (one paced phase per rate), each
    engine's and the XDP MAC-swap baseline's rate at the sender's maximum; then both engines at the
    sender's maximum with IPv4 frames and with IPv6 ones (GRE over IPv6 carrying IPv6, to IPv6 backends),
    family_rounds times each, in one command so both families see the same machine."""
    points: dict[str, list[dict[str, float]]] = {"afpacket": [], "xdp": []}
    at_max: dict[str, list[dict[str, float]]] = {"afpacket": [], "xdp": [], "baseline": []}
    for i, rate in enumerate(rates):
        engines = "baseline,afpacket,xdp" if i == 0 else "afpacket,xdp"
        result = run_script("engine_rates", ["--engines", engines, "--rate", str(rate), "--seconds-paced",
                                             f"{seconds:g}", "--packets-max", str(max_packets)], log)
        for kind, res in result["results"].items():
            for row in res["phases"].get("paced", []) if kind != "baseline" else []:
                points[kind].append({"rate_kpps": rate / 1e3, **_row(row)})
            for row in res["phases"].get("max", []):
                at_max[kind].append(_row(row))
    result = run_script("engine_rates", ["--engines", "afpacket,xdp", "--traffic", "ipv4,ipv6", "--phases", "max",
                                         "--packets-max", str(max_packets), "--rounds", str(family_rounds)], log)
    families: dict[str, dict[str, list[dict[str, float]]]] = {"ipv4": {}, "ipv6": {}}
    for key, res in result["results"].items():
        kind, _, traffic = key.partition("/")
        families[traffic or "ipv4"][kind] = [_row(row) for row in res["phases"]["max"]]
    return {"paced": points, "max": at_max, "seconds": seconds, "max_packets": max_packets, "families": families,
            "family_frame_bytes": result["frame_bytes"], "family_rounds": family_rounds}


def _row(row: dict[str, Any]) -> dict[str, float]:
    return {"offered_kpps": row["offered_kpps"], "delivered_kpps": row["delivered_kpps"], "ratio": row["ratio"],
            "cpu1_us_per_pkt": row.get("cpu1_us_per_pkt", 0.0), "lag_s": row.get("lag_s", 0.0)}
