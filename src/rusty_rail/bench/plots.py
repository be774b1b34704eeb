"""The report's PNG plots (matplotlib, headless). One function per figure: results dict in, file out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt  # noqa: E402

DPI = 110
PATH_COLOURS = {"direct": "#444444", "gre": "#999999", "rr-xdp": "#d62728", "rr-xdp-generic": "#ff9896",
                "rr-afpacket": "#9467bd", "haproxy": "#1f77b4", "nft": "#2ca02c"}


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def maglev_balance(result: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for size, rows in result["balance"].items():
        ns = sorted(int(n) for n in rows)
        ax.plot(ns, [rows[n]["max_over_min"] for n in ns], "o-", label=f"max/min, M={size}")
        ax.plot(ns, [rows[n]["max_over_avg"] for n in ns], "x--", label=f"max/avg, M={size}")
    ax.set_xscale("log")
    ax.set_xlabel("backends N")
    ax.set_ylabel("slots per backend: ratio")
    ax.set_title("Maglev balance (equal weights)")
    ax.axhline(1.01, color="grey", lw=0.8, ls=":", label="1% (the paper's M > 100 N)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def maglev_disruption(result: dict[str, Any], path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for size, rows in result["one_change"].items():
        ns = sorted(int(n) for n in rows)
        left.plot(ns, [100 * rows[n]["leave"] for n in ns], "o-", label=f"one leaves, M={size}")
        left.plot(ns, [100 * rows[n]["join"] for n in ns], "s--", label=f"one joins, M={size}")
    ns = sorted(int(n) for n in next(iter(result["one_change"].values())))
    left.plot(ns, [100 / n for n in ns], "k:", label="minimum: 1/N")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("backends N")
    left.set_ylabel("table slots moved (%)")
    left.set_title("One backend leaves or joins")
    left.legend(fontsize=8)
    for size, rows in result["failures"].items():
        pcts = sorted(int(p) for p in rows)
        right.plot(pcts, [100 * rows[p] for p in pcts], "o-", label=f"M={size}")
    pcts = sorted(int(p) for p in next(iter(result["failures"].values())))
    right.plot(pcts, pcts, "k:", label="minimum: the failed share")
    right.set_xlabel("backends failed at once (%), N = 1000")
    right.set_ylabel("table entries changed (%)")
    right.set_title("Resilience (the paper's section 5.3 figure)")
    right.legend(fontsize=8)
    return _save(fig, path)


def engine_rates(result: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for kind, colour in (("afpacket", "#9467bd"), ("xdp", "#d62728")):
        points = [(p["offered_kpps"], 100 * p["ratio"]) for p in result["paced"][kind]]
        points += [(p["offered_kpps"], 100 * p["delivered_kpps"] / p["offered_kpps"]) for p in result["max"][kind]]
        points.sort()
        ax.plot([x for x, _ in points], [y for _, y in points], "o-", color=colour, label=kind)
    for p in result["max"].get("baseline", []):
        ax.plot([p["offered_kpps"]], [100 * p["delivered_kpps"] / p["offered_kpps"]], "k^",
                label="baseline XDP MAC swap, sender's max")
    ax.set_xlabel("offered (kpps, 84-byte GRE frames, random flows)")
    ax.set_ylabel("delivered / offered (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Both engines on a veth pair (trafgen)")
    ax.legend(fontsize=8)
    return _save(fig, path)


XDP_CASES = (("baseline", "baseline\nMAC swap"), ("hit", "hit"), ("hit_conns", "hit in\nrr_conns"),
             ("hit_named", "hit,\nnamed service"),
             ("miss_expired", "miss\n(expired)"), ("miss_deleted", "miss\n(deleted)"), ("hit_v6", "IPv6\nhit"),
             ("miss_expired_v6", "IPv6 miss\n(expired)"))


def xdp_costs(result: dict[str, Any], path: Path) -> Path:
    ns = result["ns_per_packet"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    cases = [(key, label) for key, label in XDP_CASES if key in ns]
    bars = ax.bar([label for _, label in cases], [ns[key] for key, _ in cases],
                  color=["#999999"] + ["#d62728"] * (len(cases) - 1))
    for bar, (key, _) in zip(bars, cases):
        ax.annotate(f"{ns[key]:.0f} ns\n{result['ratio_to_baseline'][key]:.2f}x", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ns per packet (BPF_PROG_TEST_RUN)")
    ax.set_title("XDP program, per path, against the baseline")
    ax.margins(y=0.2)
    return _save(fig, path)


def maglev_build(result: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    fills = result["fills"]
    labels = [f"M={f['size']}\nN={f['backends']}" for f in fills]
    xs = range(len(fills))
    ax.bar([x - 0.2 for x in xs], [f["c"]["median_ms"] for f in fills], 0.4, label="C -O2 (Pseudocode 1)",
           color="#999999")
    bars = ax.bar([x + 0.2 for x in xs], [f["numpy"]["median_ms"] for f in fills], 0.4, label="rusty_rail (numpy)",
                  color="#d62728")
    for bar, f in zip(bars, fills):
        ax.annotate(f"{f['ratio_median']:.1f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels)
    ax.set_yscale("log")
    ax.set_ylabel("table fill, ms (median)")
    ax.set_title("Maglev table build against the C reference")
    ax.legend(fontsize=8)
    return _save(fig, path)


def e2e(summary: dict[str, Any], path: Path) -> Path:
    modes = [m for m in ("lab", "wire") if m in summary]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        tests = list(summary[mode])
        paths = [p for p in PATH_COLOURS if any(p in summary[mode][t] for t in tests) and p != "direct"]
        width = 0.8 / max(1, len(paths))
        for i, p in enumerate(paths):
            xs = [t + (i - (len(paths) - 1) / 2) * width for t in range(len(tests))]
            ax.bar(xs, [summary[mode][t].get(p, {}).get("ratio_direct", 0) for t in tests], width,
                   label=p, color=PATH_COLOURS[p])
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_xticks(range(len(tests)), tests)
        ax.set_ylabel("median / the direct path's median")
        ax.set_title("lab as it is" if mode == "lab" else "wire-like (TSO/GSO/GRO off on every veth)")
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
