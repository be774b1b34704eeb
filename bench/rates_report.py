"""engine_rates.py's summary: a table of the phases' medians [min-max over rounds], and the targets."""

from __future__ import annotations

import statistics
from typing import Any

TARGETS = {"afpacket": ("paced", 0.99), "xdp": ("max", 0.98)}
"""engine -> (phase, delivered/offered it must reach): the issues' targets (AF_PACKET: at the paced rate)."""


def med(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def spread(rows: list[dict[str, Any]], key: str, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    vals = [r[key] * scale for r in rows]
    s = fmt.format(statistics.median(vals))
    return s + (f" [{fmt.format(min(vals))}-{fmt.format(max(vals))}]" if len(vals) > 1 else "")


def summarise(results: dict[str, Any]) -> list[str]:
    lines = []
    base = results.get("baseline", {}).get("phases", {}).get("max")
    base_kpps = med(base, "delivered_kpps") if base else None
    lines.append(f"{'engine':15} {'phase':6} {'offered kpps':>14} {'delivered kpps':>16} {'deliv/offered %':>18} "
                 f"{'engine us/pkt':>14} {'CPU1 us/pkt':>12} {'lag s':>6} {'x baseline':>10}")
    for kind, res in results.items():
        for name in ("paced", "max"):
            rows = res["phases"][name]
            if not rows:
                continue
            vs = f"{med(rows, 'delivered_kpps') / base_kpps:10.2f}" if base_kpps and name == "max" else " " * 10
            lines.append(f"{kind:15} {name:6} {spread(rows, 'offered_kpps'):>14} {spread(rows, 'delivered_kpps'):>16} "
                         f"{spread(rows, 'ratio', 100, '{:.2f}'):>18} {spread(rows, 'engine_us_per_pkt', 1, '{:.2f}'):>14} "
                         f"{spread(rows, 'cpu1_us_per_pkt', 1, '{:.2f}'):>12} {max(r['lag_s'] for r in rows):6.2f} {vs}")
    for kind, res in results.items():  # "<engine>" or "<engine>/<traffic>": the engine's target either way
        name, target = TARGETS.get(kind.split("/")[0], ("", 0.0))
        if name and res["phases"][name]:
            rows = res["phases"][name]
            worst = min(r["ratio"] for r in rows)
            kept = min(r["delivered_kpps"] / r["offered_kpps"] for r in rows)  # rate kept up, lag included
            ok = worst >= target and kept >= target
            lines.append(f"target {kind} {name}: delivered/offered >= {target:.0%}: worst {worst:.2%}, delivered "
                         f"rate / offered rate (drain time included) worst {kept:.2%} -> {'MET' if ok else 'MISSED'}")
    return lines
