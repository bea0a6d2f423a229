"""report.md and its figures are written and carry the key numbers."""

from __future__ import annotations

import pandas as pd
import pytest

from vopd_bench import analysis, plots, report
from vopd_bench.records import Record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_INFO = {"model": "tiny/qwen2-vl-random", "model_fingerprint": "fp1234", "finished_at": "2026-11-26T10:00:00+0000"}


def rec(sid: str, view: str, correct: bool | None, *, area: float | None = 0.003, boxes=((5, 5, 15, 15),),
        clamped: int = 0, error: str | None = None, cat: str = "color") -> Record:
    return Record(key=f"{sid}/{view}", benchmark="synthetic", sample_id=sid, view=view, category=cat,
                  question="What colour is the triangle?", options=["red", "green"], answer="A",
                  response="A" if correct else "B", parsed=None if error else ("A" if correct else "B"),
                  correct=None if error else correct, error=error, error_kind="backend" if error else None,
                  boxes=[list(b) for b in boxes], boxes_clamped=clamped, evidence_area=area if boxes else None)


def records() -> list[Record]:
    # Ten paired samples: full right on 2, crop right on 8, box right on 5 -> gap +60 pp = +30 + +30.
    out = []
    for i in range(10):
        area = 0.0005 if i < 5 else 0.03
        cat = "color" if i % 2 else "shape"
        out += [rec(f"s{i}", "full", i < 2, area=area, cat=cat, clamped=int(i == 0)),
                rec(f"s{i}", "crop", i < 8, area=area, cat=cat),
                rec(f"s{i}", "box", i < 5, area=area, cat=cat)]
    out.append(rec("n1", "full", True, boxes=()))
    out.append(rec("n2", "full", None, boxes=(), error="timeout after 60 s"))
    return out


def test_report_and_figures_written(tmp_path):
    recs = records()
    summary = analysis.summarize(recs, n_boot=300)
    path = report.write_report(tmp_path, summary, recs, RUN_INFO)
    assert path == tmp_path / "report.md"
    text = path.read_text()

    for name in ("accuracy.png", "gap.png", "gap_by_area.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text

    assert text.startswith("# Gap report: tiny/qwen2-vl-random")
    assert "2026-11-26" in text and "fp1234" in text
    assert "where to look" in text and "how closely" in text

    # acc_full = 3/11 valid full records (s0, s1, n1), crop 8/10, box 5/10. Wilson 95% for 3/11, by hand:
    # centre (p + z²/2n)/(1 + z²/n) = 0.3316, half-width z·sqrt(p(1−p)/n + z²/4n²)/(1 + z²/n) = 0.2341.
    assert "| 27.3 [9.7, 56.6] |" in text
    assert "27.3 [" in text and "80.0 [" in text and "50.0 [" in text
    assert "+60.0 [" in text and "+30.0 [" in text  # gap, and both of its parts
    # McNemar, full vs crop on the 10 paired samples: 6 discordant pairs, all one way: p = 2·0.5⁶ = 0.03125
    assert "| 10 | 0.031 |" in text
    # Transitions: both right 2, recoverable 6, crop-only failure 0, both wrong 2, paired n 10.
    assert "| synthetic | 2 | 6 | 0 | 2 | 10 |" in text
    # Gap by evidence size: 0-0.1% holds s0–s4 (gap 3/5), 2-5% holds s5–s9 (gap 3/5).
    assert "| synthetic | 0-0.1% | 5 | +60.0 [" in text and "| synthetic | 2-5% | 5 | +60.0 [" in text
    # Notes: the full-only samples, the clamped box, the error and the hand-off.
    assert "2 of 12 samples have no evidence box" in text
    assert "1 evidence box(es)" in text
    assert "timeout after 60 s" in text
    assert "6 recoverable case(s)" in text
    # Per-category table.
    assert "### synthetic" in text and "| color |" in text and "| shape |" in text


def test_full_view_only_skips_gap_figures(tmp_path):
    recs = [rec(f"s{i}", "full", i % 2 == 0, boxes=()) for i in range(6)]
    summary = analysis.summarize(recs, n_boot=100)
    path = report.write_report(tmp_path, summary, recs, {"model": "m"})
    text = path.read_text()
    assert (tmp_path / "accuracy.png").exists()
    assert not (tmp_path / "gap.png").exists() and not (tmp_path / "gap_by_area.png").exists()
    assert "gap.png" not in text and "## Transitions" not in text
    assert "50.0 [" in text


def test_empty_summary(tmp_path):
    summary = analysis.summarize([], n_boot=10)
    text = report.write_report(tmp_path, summary, [], {"model": "m"}).read_text()
    assert "No results" in text
    assert plots.plot_all(summary, tmp_path) == {}


def test_extra_metrics_listed(tmp_path):
    recs = records()
    summary = analysis.summarize(recs, n_boot=100)
    extra = pd.DataFrame([{"benchmark": "synthetic", "category": "all", "metric": "pair_accuracy", "value": 0.25,
                           "ci_low": 0.1, "ci_high": 0.4, "n": 8}])
    text = report.render_report(pd.concat([summary, extra], ignore_index=True), recs, {"model": "m"})
    assert "## Other metrics" in text and "| synthetic | all | pair_accuracy | 0.25 | [0.1, 0.4] | 8 |" in text


@pytest.mark.parametrize("value,lo,hi,expected", [(0.62, 0.481, 0.741, "62.0 [48.1, 74.1]"),
                                                   (float("nan"), 0.1, 0.2, "–")])
def test_fmt_acc(value, lo, hi, expected):
    assert report.fmt_acc(value, lo, hi) == expected


def test_fmt_gap_and_p():
    assert report.fmt_gap(0.136, -0.02, 0.3) == "+13.6 [-2.0, +30.0]"
    assert report.fmt_gap(-0.05) == "-5.0"
    assert report.fmt_p(0.0004) == "<0.001" and report.fmt_p(0.34492) == "0.345"
