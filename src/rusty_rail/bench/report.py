"""The Markdown report and the flat JSON summary, from the results of one `rusty-rail bench` run."""

from __future__ import annotations

import statistics
from typing import Any

from .e2e import PATHS, UNITS

PATH_LABELS = {
    "direct": "direct (client -> server, no balancer)",
    "gre": "GRE without balancer (router -> server)",
    "rr-xdp": "Rusty Rail, XDP (auto mode)",
    "rr-xdp-generic": "Rusty Rail, XDP generic mode",
    "rr-afpacket": "Rusty Rail, AF_PACKET",
    "haproxy": "HAProxy mode tcp",
    "nft": "nftables DNAT + masquerade",
}


XDP_ROWS = (("baseline", "baseline"), ("hit", "hit (flow cache)"), ("hit_conns", "hit in rr_conns (flow cache off)"),
            ("hit_named", "hit named"), ("miss_expired", "miss expired"),
            ("miss_deleted", "miss deleted"), ("hit_v6", "IPv6 hit (v6 in v6)"),
            ("miss_expired_v6", "IPv6 miss expired (v6 in v6)"))
"""bench/xdp_test_run.py's cases, in the report's order: key -> label."""


def _f(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def _at_max(rows: list[dict[str, float]]) -> dict[str, float]:
    """Medians over rounds at the sender's maximum: delivered/offered (packets), delivered rate / offered
    rate (drain time included), delivered kpps."""
    return {"ratio": statistics.median(r["ratio"] for r in rows),
            "rate_ratio": statistics.median(r["delivered_kpps"] / r["offered_kpps"] for r in rows),
            "delivered_kpps": statistics.median(r["delivered_kpps"] for r in rows),
            "offered_kpps": statistics.median(r["offered_kpps"] for r in rows)}


def headline(results: dict[str, Any]) -> dict[str, float]:
    """Every figure the issue asks for, flat: printed as JSON at the end and tabled at the top."""
    out: dict[str, float] = {}
    build = results.get("maglev_build")
    if build:
        first = build["fills"][0]
        out["maglev_build_ms_M65537_N1000"] = first["numpy"]["median_ms"]
        out["maglev_build_c_ms_M65537_N1000"] = first["c"]["median_ms"]
        out["maglev_build_ratio_to_c"] = first["ratio_median"]
        out["maglev_rebuild_join_ms"] = build["rebuild"]["join_warm"]["median_ms"]
        out["maglev_rebuild_join_fraction_of_full"] = build["rebuild"]["join_vs_full"]
    paper = results.get("maglev_paper")
    if paper:
        for size, rows in paper["balance"].items():
            n = 1000 if 1000 in rows else max(rows)  # the paper's N, or the largest measured
            out[f"maglev_max_over_min_M{size}_N{n}"] = rows[n]["max_over_min"]
            out[f"maglev_moved_one_leaves_M{size}_N{n}"] = paper["one_change"][size][n]["leave"]
    xdp = results.get("xdp_costs")
    if xdp:
        for key, _ in XDP_ROWS:
            if key in xdp["ns_per_packet"]:
                out[f"xdp_{key}_ns"] = xdp["ns_per_packet"][key]
                out[f"xdp_{key}_ratio"] = xdp["ratio_to_baseline"][key]
        for key, ratio in xdp.get("paired_ratio_to_baseline", {}).items():
            out[f"xdp_{key}_paired_ratio"] = ratio
    rates = results.get("engine_rates")
    if rates:
        for kind, points in rates["paced"].items():
            for p in points:
                out[f"{kind}_delivered_at_{p['rate_kpps']:g}kpps"] = p["ratio"]
        for kind, rows in rates["max"].items():
            if rows:
                out[f"{kind}_kpps_at_sender_max"] = rows[0]["delivered_kpps"]
        for family, kinds in rates.get("families", {}).items():
            for kind, rows in kinds.items():
                if rows:
                    at_max = _at_max(rows)
                    out[f"{kind}_delivered_at_sender_max_{family}"] = at_max["ratio"]
                    out[f"{kind}_rate_ratio_at_sender_max_{family}"] = at_max["rate_ratio"]
                    out[f"{kind}_kpps_at_sender_max_{family}"] = at_max["delivered_kpps"]
    e2e = results.get("e2e")
    if e2e:
        for mode, tests in e2e["summary"].items():
            for test, row in tests.items():
                for path, entry in row.items():
                    out[f"e2e_{mode}_{test}_{path}_ratio_direct"] = entry.get("ratio_direct", float("nan"))
                    if "retransmits" in entry:
                        out[f"e2e_{mode}_{test}_{path}_retransmits"] = entry["retransmits"]
                        out[f"e2e_{mode}_{test}_{path}_ofo"] = entry["ofo_queued"]
    return out


def markdown(results: dict[str, Any], machine: dict[str, Any], plots: dict[str, str]) -> str:
    lines = [
        "# Rusty Rail — benchmark report",
        "",
        f"Written by `{machine['command']}` (`make bench`) on {machine['date']}, commit {machine['commit']}.",
        f"Machine: kernel {machine['kernel']}, {machine['cpu']}, {machine['nproc']} CPUs; load average "
        f"{machine['load_start']:.2f} at the start, {machine['load_end']:.2f} at the end (a shared machine: "
        "figures are ratios against a baseline measured in the same run). JSON of every figure: `bench/results.json`.",
        "",
    ]
    carried = machine.get("carried")
    if carried and carried["sections"]:
        lines[-1:-1] = [f"Carried over from the run of {carried['date']} (commit {carried['commit']}), not measured "
                        f"again: {', '.join(carried['sections'])}."]
    for section in (_headline_section, _paper_section, _build_section, _xdp_section, _rates_section, _e2e_section,
                    _reordering_section):
        lines += section(results, plots)
    return "\n".join(lines) + "\n"


def _img(plots: dict[str, str], name: str) -> list[str]:
    return [f"![{name}]({plots[name]})", ""] if name in plots else []


def _headline_section(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    h = headline(results)
    rows = []
    if "maglev_build_ratio_to_c" in h:
        rows.append(("Maglev build, M=65537, N=1000", f"{_f(h['maglev_build_ms_M65537_N1000'])} ms",
                     f"C -O2: {_f(h['maglev_build_c_ms_M65537_N1000'])} ms", f"{_f(h['maglev_build_ratio_to_c'])}x C"))
        rows.append(("rebuild after one backend joins", f"{_f(h['maglev_rebuild_join_ms'])} ms",
                     "full build, cold hash cache", f"{_f(h['maglev_rebuild_join_fraction_of_full'])} of full"))
    for kind in ("afpacket", "xdp"):
        if f"{kind}_delivered_at_200kpps" in h:
            rows.append((f"{kind} delivered at 200 kpps offered", f"{100 * h[f'{kind}_delivered_at_200kpps']:.2f}%",
                         "offered", ""))
    if "xdp_hit_ratio" in h:
        for key, label in XDP_ROWS[1:]:
            if key != "hit_named" and f"xdp_{key}_ns" in h:
                paired = f" (paired: {_f(h[f'xdp_{key}_paired_ratio'])}x)" if f"xdp_{key}_paired_ratio" in h else ""
                rows.append((f"XDP {label}", f"{_f(h[f'xdp_{key}_ns'], 1)} ns",
                             f"MAC swap: {_f(h['xdp_baseline_ns'], 1)} ns", f"{_f(h[f'xdp_{key}_ratio'])}x{paired}"))
    for kind in ("afpacket", "xdp"):
        if f"{kind}_delivered_at_sender_max_ipv6" in h and f"{kind}_delivered_at_sender_max_ipv4" in h:
            v4, v6 = (f"{100 * h[f'{kind}_delivered_at_sender_max_{f}']:.2f}% of packets, {100 * h[f'{kind}_rate_ratio_at_sender_max_{f}']:.2f}% of the rate"
                      f" ({_f(h[f'{kind}_kpps_at_sender_max_{f}'], 1)} kpps)" for f in ("ipv4", "ipv6"))
            rows.append((f"{kind} delivered at the sender's max, IPv6", v6, f"IPv4: {v4}",
                         f"{_f(h[f'{kind}_kpps_at_sender_max_ipv6'] / h[f'{kind}_kpps_at_sender_max_ipv4'])}x IPv4's kpps"))
    summary = results.get("e2e", {}).get("summary", {})
    wire_up = summary.get("wire", {}).get("upload", {})
    if "rr-xdp" in wire_up and "gre" in wire_up:
        rows.append(("wire-like upload, Rusty Rail XDP", f"{_f(wire_up['rr-xdp']['ratio_gre'])}x GRE path",
                     f"GRE without balancer: {_f(wire_up['gre']['median'])} Gbit/s",
                     f"retransmits {wire_up['rr-xdp']['retransmits']:.0f} vs {wire_up['gre']['retransmits']:.0f}"))
    if not rows:
        return []
    out = ["## The figures asked for", "", "| figure | value | baseline (same run) | ratio |", "| --- | --- | --- | --- |"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return out + [""]


def _paper_section(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    r = results.get("maglev_paper")
    if not r:
        return []
    out = ["## Maglev in the paper's terms (Eisenbud et al., NSDI 2016, section 5.3)", "",
           "Balance: the most and fewest slots any backend holds (equal weights), and the most against the "
           "average. Disruption: the share of slots whose backend changes when one backend leaves (beside the "
           "leaver's own share, the least any scheme moves) or joins, and when 1-20% of N = 1000 fail at once "
           "(the paper's resilience figure). Exact counts from the production build, no timing.", "",
           "| M | N | max | min | max/min | max/avg | moved, one leaves | its own share | moved, one joins |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size, rows in r["balance"].items():
        for n, b in rows.items():
            c = r["one_change"][size][n]
            out.append(f"| {size} | {n} | {b['max']} | {b['min']} | {b['max_over_min']:.4f} | {b['max_over_avg']:.4f} | "
                       f"{100 * c['leave']:.2f}% | {100 * c['leave_minimum']:.2f}% | {100 * c['join']:.2f}% |")
    out += ["", "| backends failed at once (N = 1000) | " + " | ".join(f"M={s}" for s in r["failures"]) + " |",
            "| --- | " + " | ".join("---" for _ in r["failures"]) + " |"]
    pcts = list(next(iter(r["failures"].values())))
    for p in pcts:
        out.append(f"| {p}% | " + " | ".join(f"{100 * rows[p]:.2f}% changed" for rows in r["failures"].values()) + " |")
    return out + [""] + _img(plots, "maglev_balance") + _img(plots, "maglev_disruption")


def _build_section(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    r = results.get("maglev_build")
    if not r:
        return []
    out = ["## Maglev table build against the C reference", "",
           f"The fill of Pseudocode 1: rusty_rail (numpy) against the same pseudocode in C, `gcc -O2`, compiled at "
           f"run time; same offsets and skips, tables checked identical; medians of {r['repeats']} interleaved runs.", "",
           "| M | N | C ms | numpy ms | ratio | identical |", "| --- | --- | --- | --- | --- | --- |"]
    for f in r["fills"]:
        out.append(f"| {f['size']} | {f['backends']} | {_f(f['c']['median_ms'])} | {_f(f['numpy']['median_ms'])} | "
                   f"{_f(f['ratio_median'])}x | {f['identical']} |")
    rb = r["rebuild"]
    out += ["", f"build_table(), M={rb['size']}, N={rb['backends']}: full build with a cold hash cache "
            f"{_f(rb['full_cold']['median_ms'])} ms; rebuild after one backend joins {_f(rb['join_warm']['median_ms'])} ms, "
            f"after one leaves {_f(rb['leave_warm']['median_ms'])} ms ({_f(rb['join_vs_full'])} of the full build).", ""]
    return out + _img(plots, "maglev_build")


def _xdp_section(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    r = results.get("xdp_costs")
    if not r:
        return []
    ns, ratio, paired = r["ns_per_packet"], r["ratio_to_baseline"], r.get("paired_ratio_to_baseline", {})
    out = ["## The XDP program per path (BPF_PROG_TEST_RUN)", "",
           f"84-byte frame (IPv6 rows: {r.get('frame_bytes', {}).get('ipv6') or 124}-byte, GRE over IPv6 carrying IPv6 "
           f"UDP, to IPv6 backends), repeat {r['repeat']:,}, median of {r['rounds']} rounds; baseline: "
           "bpf/xdp_baseline.o (swap MACs, XDP_TX) in the same process. Paired: the baseline and the case back to "
           "back in each round, the median of the rounds' ratios (steadier on a loaded machine). Every repetition "
           "is the same flow, so a hit after the first comes from the CPU's flow cache (docs/WIRE.md section 7), as "
           "a flow's later packets in a tick do; \"hit in rr_conns\" is a flow's first packet in a tick: the cache "
           "turned off, the entry looked up in the connection table.", "",
           "| path | ns/packet | x baseline | paired x baseline |", "| --- | --- | --- | --- |"]
    for key, label in XDP_ROWS:
        if key in ns:
            out.append(f"| {label} | {ns[key]:.1f} | {ratio[key]:.2f} | {f'{paired[key]:.2f}' if key in paired else '-'} |")
    return out + [""] + _img(plots, "xdp_costs")


def _rates_section(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    r = results.get("engine_rates")
    if not r:
        return []
    out = ["## Both engines on a veth pair: delivered against offered", "",
           f"trafgen, 84-byte GRE frames, random inner flows (the miss path), {r['seconds']:g} s per paced rate, "
           f"then {r['max_packets']:,} packets at the sender's maximum (bench/engine_rates.py).", "",
           "| engine | offered kpps | delivered kpps | delivered/offered | CPU1 us/packet |", "| --- | --- | --- | --- | --- |"]
    for kind in ("afpacket", "xdp"):
        for p in r["paced"][kind]:
            out.append(f"| {kind} | {p['offered_kpps']:.1f} | {p['delivered_kpps']:.1f} | {100 * p['ratio']:.2f}% | "
                       f"{p['cpu1_us_per_pkt']:.2f} |")
    for kind, rows in r["max"].items():
        for p in rows:
            out.append(f"| {kind}, sender's max | {p['offered_kpps']:.1f} | {p['delivered_kpps']:.1f} | "
                       f"{100 * p['delivered_kpps'] / p['offered_kpps']:.2f}% (rate) | {p['cpu1_us_per_pkt']:.2f} |")
    out += [""] + _img(plots, "engine_rates")
    families = r.get("families")
    if families:
        sizes = r.get("family_frame_bytes", {})
        out += ["### IPv4 and IPv6 at the sender's maximum", "",
                f"One command, {r.get('family_rounds', 1)} round(s) of {r['max_packets']:,} packets per engine and "
                f"family, medians: IPv4 in GRE over IPv4 ({sizes.get('ipv4', 84)}-byte frames) and IPv6 in GRE over "
                f"IPv6 to IPv6 backends ({sizes.get('ipv6', 124)}-byte frames), random inner flows. Delivered/offered "
                "counts packets; the rate column divides the delivered rate (up to the last frame delivered) by the "
                "offered one.", "",
                "| engine | family | offered kpps | delivered kpps | delivered/offered | delivered rate / offered rate |",
                "| --- | --- | --- | --- | --- | --- |"]
        for kind in ("afpacket", "xdp"):
            for family in ("ipv4", "ipv6"):
                rows = families.get(family, {}).get(kind)
                if rows:
                    m = _at_max(rows)
                    out.append(f"| {kind} | {family} | {m['offered_kpps']:.1f} | {m['delivered_kpps']:.1f} | "
                               f"{100 * m['ratio']:.2f}% | {100 * m['rate_ratio']:.2f}% |")
        out.append("")
    return out


def _e2e_section(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    r = results.get("e2e")
    if not r:
        return []
    out = ["## End to end, against what a user would pick instead", "",
           f"Topology 2 of the lab (one client, the router, one balancer host, two servers); iperf3 upload and "
           f"download (-R) to server1, wrk with {r['connections']} connections against nginx (1 KiB, 1 MiB objects); "
           f"{r['seconds']:g} s per test, medians of {r['rounds']} rounds, every path in every round. Each cell: the "
           "path's median over the direct path's median, and the median itself. 'wire' = TSO/GSO/GRO off on every "
           "veth of the lab. HTTP over both servers on every balanced path; the direct path reaches server1 only.", ""]
    for mode, tests in r["summary"].items():
        names = list(tests)
        out += [f"### {'The lab as it is' if mode == 'lab' else 'Wire-like'}", "",
                "| path | " + " | ".join(f"{t} ({UNITS[t]})" for t in names) + " |",
                "| --- | " + " | ".join("---" for _ in names) + " |"]
        for p in PATHS:
            if not any(p in tests[t] for t in names):
                continue
            cells = []
            for t in names:
                e = tests[t].get(p)
                cells.append(f"{e['ratio_direct']:.2f}x ({e['median']:.3g}, {e['min']:.3g}-{e['max']:.3g})" if e else "-")
            out.append(f"| {PATH_LABELS[p]} | " + " | ".join(cells) + " |")
        out.append("")
        iperf = [t for t in names if t in ("upload", "download")]
        if iperf:
            out += [f"TCP per iperf3 test ({mode}), medians: the sender's retransmissions, the receiver's segments "
                    "queued out of order (TcpExt TCPOFOQueue), the sender's reordering detections "
                    "(TCPSACKReorder + TCPTSReorder), and the frames the receiver's device took per MB (a TSO or "
                    "GRO super-packet once).", "",
                    "| path | " + " | ".join(f"{t}: retrans / out-of-order / reorder seen / frames per MB" for t in iperf)
                    + " |", "| --- | " + " | ".join("---" for _ in iperf) + " |"]
            for p in PATHS:
                if p in tests[iperf[0]]:
                    out.append(f"| {PATH_LABELS[p]} | " + " | ".join(_tcp_cell(tests[t][p]) for t in iperf) + " |")
            out += ["", *_upload_frames(tests.get("upload", {}))]
    return out + _img(plots, "e2e")


def _tcp_cell(e: dict[str, float]) -> str:
    frames = f"{e['frames_per_mb']:.0f}" if "frames_per_mb" in e else "-"  # results from before the figure
    return f"{e['retransmits']:.0f} / {e['ofo_queued']:.0f} / {e['reorder_seen']:.0f} / {frames}"


def _upload_frames(up: dict[str, dict[str, float]]) -> list[str]:
    """Why a balanced upload and HAProxy's differ, in this run's frames per MB at server1: said only where
    HAProxy's server took at most half the balanced path's frames (with TSO off, as wire-like, it does not)."""
    if not all("frames_per_mb" in up.get(p, {}) for p in ("rr-xdp", "gre", "haproxy")):
        return []
    if up["haproxy"]["frames_per_mb"] > 0.5 * up["rr-xdp"]["frames_per_mb"]:
        return []
    return [f"Upload, frames per MB at server1: a balancer returns every segment to the wire as the router "
            f"sent it, so server1 takes {up['rr-xdp']['frames_per_mb']:.0f} through Rusty Rail XDP and "
            f"{up['gre']['frames_per_mb']:.0f} on the GRE path without a balancer; HAProxy ends the client's TCP "
            f"and sends its own toward the server in TSO super-packets, {up['haproxy']['frames_per_mb']:.0f} per MB. "
            "The lab's hosts share this machine's CPUs, so the balancer's hop is paid per frame on the balanced "
            "paths, and HAProxy's server side per super-packet.", ""]


def _reordering_section(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    summary = results.get("e2e", {}).get("summary", {})
    rows = []
    for mode in ("lab", "wire"):
        up = summary.get(mode, {}).get("upload", {})
        for p in PATHS:
            if p in up and p not in ("haproxy", "nft"):  # full proxies: two TCP connections, not one flow
                rows.append(f"| {mode} | {PATH_LABELS[p]} | {up[p]['ofo_queued']:.0f} | {up[p]['reorder_seen']:.0f} | "
                            f"{up[p]['retransmits']:.0f} | {_ratio(up[p]['retransmits'], up.get('gre', {}).get('retransmits'))} |")
    if not rows:
        return []
    return ["## Does the balancer reorder a flow?", "",
            "`tests/test_ordering_netns.py` (part of `make test`) answers for the balancer alone: 64 flows of 64 "
            "numbered segments, sent from both CPUs at once (each flow from one), through `python -m rusty_rail` "
            "with the AF_PACKET engine on two workers, XDP native and XDP generic; every flow must come back "
            "complete, in the order it was sent and to one backend.", "",
            "In the lab, the receiver of an iperf3 upload does queue segments out of order. The medians below put "
            "each path beside the direct path, which has neither balancer nor tunnel: what it shows comes from the "
            "lab's veths, not from a balancer. A veth without NAPI hands each frame to the receive backlog of the "
            "CPU that sent it, and a TCP sender transmits from both CPUs (the application's, and the one that "
            "processes the ACKs), so two segments of one flow can be delivered from two backlogs in either order. "
            "A veth whose device runs native XDP receives through one NAPI ring instead, which keeps a flow's order "
            "on that hop.", "",
            "| mode | path | out of order at the receiver | reordering seen by the sender | retransmissions | "
            "retransmissions / GRE path's |", "| --- | --- | --- | --- | --- | --- |", *rows, ""]


def _ratio(value: float, base: float | None) -> str:
    if base is None:
        return "-"
    return f"{value / base:.2f}" if base else ("1.00" if value == 0 else f"{value:.0f} vs 0")
