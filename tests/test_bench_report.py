"""`rusty-rail bench`: the report, its plots and the JSON line, from small real measurements."""

from __future__ import annotations

import json

import pytest

from rusty_rail.bench import cli, maglev_paper, report
from rusty_rail.bench.e2e import summarise


PAPER_RUN = maglev_paper.run


def small_paper() -> dict:
    return PAPER_RUN(sizes=(251, 1009), counts=(3, 7), percents=(10, 20))


def test_bench_writes_the_report_plots_and_a_json_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(maglev_paper, "run", lambda counts=None: small_paper())
    assert cli.main(["--only", "maglev", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| 1009 | 7 | 145 | 144 |" in text  # 1009 = 7 * 144 + 1: one backend holds one more slot
    assert "![maglev_balance](bench/maglev_balance.png)" in text
    for name in ("maglev_balance", "maglev_disruption"):
        assert (tmp_path / "bench" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["failures"] == {} and summary["machine"]["nproc"] >= 1
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["results"]["maglev_paper"]["sizes"] == [251, 1009]


def test_a_failing_section_is_reported_and_the_exit_status_says_so(tmp_path, monkeypatch) -> None:
    def broken(counts=None):
        raise RuntimeError("no table today")

    monkeypatch.setattr(maglev_paper, "run", broken)
    assert cli.main(["--only", "maglev", "--out", str(tmp_path)]) == 1
    assert "- maglev: RuntimeError: no table today" in (tmp_path / "BENCHMARKS.md").read_text()


def test_unknown_section_is_an_error(tmp_path) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--only", "maglev,speed", "--out", str(tmp_path)])


def test_end_to_end_table_gives_every_path_its_ratio_to_direct() -> None:
    rows = [{"value": 2.0, "retransmits": 1.0, "ofo_queued": 0.0, "reorder_seen": 0.0}]
    half = [{**rows[0], "value": 1.0}]
    e2e = {"rounds": 1, "seconds": 1.0, "connections": 64,
           "summary": summarise({"wire": {"direct": {"upload": rows}, "gre": {"upload": half}, "rr-xdp": {"upload": half}}})}
    text = "\n".join(report._e2e_section({"e2e": e2e}, {}))
    assert "| GRE without balancer (router -> server) | 0.50x (1, 1-1) |" in text
    assert "| Rusty Rail, XDP (auto mode) | 1 / 0 / 0 / - |" in text  # results from before frames_per_mb
    assert report.headline({"e2e": e2e})["e2e_wire_upload_rr-xdp_ratio_direct"] == 0.5


def test_upload_frames_per_mb_explain_haproxy_beside_the_balanced_paths() -> None:
    def rows(value: float, frames: float) -> list[dict[str, float]]:
        return [{"value": value, "retransmits": 0.0, "ofo_queued": 0.0, "reorder_seen": 0.0, "frames_per_mb": frames}]

    paths = {"direct": rows(4.0, 705.0), "gre": rows(3.8, 712.0), "rr-xdp": rows(2.4, 713.0), "haproxy": rows(4.0, 91.0)}
    e2e = {"rounds": 1, "seconds": 1.0, "connections": 64,
           "summary": summarise({"lab": {p: {"upload": r} for p, r in paths.items()}})}
    text = "\n".join(report._e2e_section({"e2e": e2e}, {}))
    assert "| Rusty Rail, XDP (auto mode) | 0 / 0 / 0 / 713 |" in text
    assert "server1 takes 713 through Rusty Rail XDP and 712 on the GRE path" in text
    assert "TSO super-packets, 91 per MB" in text
    paths["haproxy"] = rows(1.5, 731.0)  # wire-like: HAProxy's server takes MTU frames too
    e2e["summary"] = summarise({"wire": {p: {"upload": r} for p, r in paths.items()}})
    assert "TSO super-packets" not in "\n".join(report._e2e_section({"e2e": e2e}, {}))
    del paths["haproxy"]  # no HAProxy in the run: nothing to explain
    e2e["summary"] = summarise({"lab": {p: {"upload": r} for p, r in paths.items()}})
    assert "TSO super-packets" not in "\n".join(report._e2e_section({"e2e": e2e}, {}))


def _row(offered: float, delivered: float, ratio: float) -> dict:
    return {"offered_kpps": offered, "delivered_kpps": delivered, "ratio": ratio, "cpu1_us_per_pkt": 2.0, "lag_s": 0.0}


def test_the_ipv6_rows_beside_ipv4s() -> None:
    """The XDP costs' IPv6 cases (with the paired ratios) and both engines at the sender's maximum per
    family reach the tables and the flat figures; nothing measured is dropped."""
    ns = {"baseline": 25.0, "hit": 70.0, "hit_named": 90.0, "miss_expired": 225.0, "miss_deleted": 270.0,
          "hit_v6": 75.0, "miss_expired_v6": 250.0}
    xdp = {"ns_per_packet": ns, "ratio_to_baseline": {k: v / 25.0 for k, v in ns.items()},
           "paired_ratio_to_baseline": {"hit": 2.8, "hit_v6": 2.9}, "frame_bytes": {"ipv4": 84, "ipv6": 104},
           "repeat": 1000, "rounds": 3}
    families = {"ipv4": {"afpacket": [_row(400, 130, 1.0), _row(420, 140, 1.0)], "xdp": [_row(560, 558, 1.0)]},
                "ipv6": {"afpacket": [_row(380, 60, 0.99), _row(390, 70, 1.0)], "xdp": [_row(500, 495, 1.0)]}}
    rates = {"paced": {"afpacket": [], "xdp": []}, "max": {"afpacket": [], "xdp": [], "baseline": []}, "seconds": 1.0,
             "max_packets": 1000, "families": families, "family_frame_bytes": {"ipv4": 84, "ipv6": 124},
             "family_rounds": 2}
    results = {"xdp_costs": xdp, "engine_rates": rates}
    h = report.headline(results)
    assert h["xdp_hit_v6_ratio"] == 3.0 and h["xdp_miss_expired_v6_ns"] == 250.0 and h["xdp_hit_v6_paired_ratio"] == 2.9
    assert h["afpacket_kpps_at_sender_max_ipv6"] == 65.0 and h["afpacket_delivered_at_sender_max_ipv6"] == 0.995
    assert h["xdp_rate_ratio_at_sender_max_ipv6"] == 0.99 and h["xdp_kpps_at_sender_max_ipv4"] == 558.0
    text = "\n".join(report._xdp_section(results, {}) + report._rates_section(results, {}) +
                     report._headline_section(results, {}))
    assert "| IPv6 hit (v6 in v6) | 75.0 | 3.00 | 2.90 |" in text
    assert "| IPv6 miss expired (v6 in v6) | 250.0 | 10.00 | - |" in text
    assert "| afpacket | ipv6 | 385.0 | 65.0 | 99.50% | 16.87% |" in text
    assert "| xdp | ipv4 | 560.0 | 558.0 | 100.00% | 99.64% |" in text
    assert "| XDP IPv6 hit (v6 in v6) | 75.0 ns | MAC swap: 25.0 ns | 3.00x (paired: 2.90x) |" in text
    assert ("| xdp delivered at the sender's max, IPv6 | 100.00% of packets, 99.00% of the rate (495.0 kpps) | "
            "IPv4: 100.00% of packets, 99.64% of the rate (558.0 kpps) | 0.89x IPv4's kpps |") in text


def test_previous_results_fill_the_sections_not_run(tmp_path, monkeypatch) -> None:
    """--previous: a section not run now comes from the earlier results.json (integer keys and all) and
    the report says from when; a section run now replaces the earlier one."""
    monkeypatch.setattr(maglev_paper, "run", lambda counts=None: small_paper())
    earlier = {"machine": {"date": "2026-01-02 03:04 UTC", "commit": "abc1234"},
               "results": {"maglev_paper": {"stale": True},
                           "xdp_costs": {"ns_per_packet": {"baseline": 25.0, "hit_v6": 75.0},
                                         "ratio_to_baseline": {"baseline": 1.0, "hit_v6": 3.0}, "repeat": 10, "rounds": 1}}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    assert cli.main(["--only", "maglev", "--previous", str(path), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "BENCHMARKS.md").read_text()
    assert "Carried over from the run of 2026-01-02 03:04 UTC (commit abc1234), not measured again: xdp_costs." in text
    assert "| IPv6 hit (v6 in v6) | 75.0 | 3.00 | - |" in text
    assert "| 1009 | 7 | 145 | 144 |" in text  # this run's Maglev figures, with integer table sizes
    saved = json.loads((tmp_path / "out" / "bench" / "results.json").read_text())
    assert set(saved["results"]) == {"maglev_paper", "xdp_costs"} and "stale" not in saved["results"]["maglev_paper"]
