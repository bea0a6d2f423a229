"""Every figure vopd writes is laid out so a person can read it: no text cut by the canvas edge, no legend over a
title or another legend. Checked on the renderer's own extents (tests/figure_layout.py), with long run names
and the paper's published rows in the chart, where the old layouts broke."""

from __future__ import annotations

from pathlib import Path

import pytest
from figure_layout import capture_figures, layout_problems

from vopd_bench import analysis, plots
from vopd_bench.compare import compare_dirs
from vopd_bench.leaderboard import CHART_PUBLISHED, RunSummary, benchmarks_of, build_leaderboard
from vopd_bench.plots_compare import plot_leaderboard
from vopd_train import plots as train_plots
from vopd_train.remeasure import before_after_table

LONG_A = "qwen3.5-4b-after-300-steps-of-distillation-on-mined-failures"
LONG_B = "qwen3.5-4b-before-any-training-with-its-stock-weights-and-template"


@pytest.fixture
def runs(before_after_runs) -> Path:
    """The session's two scripted runs of 24 samples (conftest.py)."""
    return before_after_runs


def _as(bench: str, records: list) -> list:
    return [{**r, "benchmark": bench} for r in records]


def _records(run_dir: Path) -> list:
    from vopd_bench.compare import read_records

    return read_records(run_dir / "samples.jsonl")


def test_leaderboard_chart_with_published_rows_and_long_names(runs, tmp_path):
    """Runs on two of the paper's benchmarks: the chart draws the published bars too, and a long legend."""
    summaries = []
    for name, folder in ((LONG_A, "after"), (LONG_B, "before")):
        recs = [r for bench in ("vstar", "zoombench") for r in _as(bench, _records(runs / folder))]
        summaries.append(RunSummary(tmp_path / name, name, analysis.summarize(recs, n_boot=50)))
    df = build_leaderboard(summaries, with_published=True)
    measured = df[df["source"] == "measured"]
    with capture_figures() as figs:
        assert plot_leaderboard(df, tmp_path / "lb.png", benchmarks_of(measured), published_models=CHART_PUBLISHED)
    [fig] = figs
    legend = [t.get_text().replace("\n", "") for t in fig.legends[0].get_texts()]
    assert legend[:2] == [LONG_A, LONG_B] and any("(paper" in x for x in legend)  # the case that broke
    assert layout_problems(fig) == []


def test_compare_chart_with_long_labels(runs, tmp_path):
    with capture_figures() as figs:
        res = compare_dirs(runs / "before", runs / "after", tmp_path, label_a=LONG_B, label_b=LONG_A, n_boot=50)
    [fig] = figs
    assert res.files["png"].name == "compare.png"
    assert layout_problems(fig) == []


def test_report_figures(runs, tmp_path):
    summary = analysis.summarize(_records(runs / "before") + _as("vstar", _records(runs / "after")), n_boot=50)
    with capture_figures() as figs:
        written = plots.plot_all(summary, tmp_path)
    assert {"accuracy.png", "gap.png", "gap_by_area.png"} <= set(written)
    for fig in figs:
        assert layout_problems(fig) == []


def test_distill_figures(runs, tmp_path):
    history = [{"step": s, "divergence": 1 / s, "agree": 0.5, "entropy": 1.0, "resp_len": 4.0,
                "grad_norm": 0.004 * s, "lr": 1e-3} for s in range(1, 31)]
    evals = [{"step": s, "acc_full": 0.3 + s / 100, "acc_crop": 0.7, "acc_box": 0.5, "gap": 0.4 - s / 100,
              "mean_full_crop": 0.5 + s / 200, "n": 128} for s in (0, 10, 20, 30)]
    table = before_after_table(_records(runs / "before"), _records(runs / "after"), n_boot=50)
    with capture_figures() as figs:
        train_plots.plot_curves(history, tmp_path / "train_curves.png", evals=evals, best_step=20)
        train_plots.plot_before_after(table, tmp_path / "before_after.png")
    assert len(figs) == 2
    for fig in figs:
        assert layout_problems(fig) == []
