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
    assert "| Rusty Rail, XDP (auto mode) | 1 / 0 / 0 |" in text
    assert report.headline({"e2e": e2e})["e2e_wire_upload_rr-xdp_ratio_direct"] == 0.5
