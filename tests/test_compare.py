"""vopd compare: paired differences between two runs; per-run values equal their summaries exactly."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import report_fixtures as rf
from typer.testing import CliRunner

from vopd_bench import analysis
from vopd_bench.cli_reports import app
from vopd_bench.compare import COMPARE_COLUMNS, compare_dirs, compare_records, read_records
from vopd_bench.errors import VopdError
from vopd_bench.leaderboard import read_csv_exact, read_summary
from vopd_bench.plots_compare import plot_training_curves
from vopd_bench.records import Record

N = 24
BENCH = "local:toyset"


@pytest.fixture
def runs(before_after_runs):
    """The session's two scripted runs (conftest.py): read them, write elsewhere or beside them."""
    assert rf.SHARED_N == N
    return before_after_runs


def test_cli_writes_files_and_values_equal_the_summaries(runs):
    out = runs / "cmp"
    res = CliRunner().invoke(app, ["compare", str(runs / "before"), str(runs / "after"), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "compare.md").is_file()
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # distill's is before_after.png
    cmp = read_csv_exact(out / "compare.csv", keep_default_na=False, na_values=[""])
    assert list(cmp.columns) == COMPARE_COLUMNS

    sa, sb = read_summary(runs / "before" / "summary.csv"), read_summary(runs / "after" / "summary.csv")
    checked = 0
    for r in cmp.itertuples(index=False):
        assert r.benchmark == BENCH
        for col, s in (("a", sa), ("b", sb)):
            src = s[(s["benchmark"] == r.benchmark) & (s["category"] == r.category) & (s["metric"] == r.metric)]
            assert getattr(r, col) == src["value"].iloc[0], (r.category, r.metric, col)  # exactly
            checked += 1
        assert r.n == r.n_a == r.n_b  # every sample is shared and valid in both runs
        assert r.ci_low <= r.diff <= r.ci_high
    assert checked == 2 * 6 * 3  # two runs × 6 metrics × (all, even, odd)

    allc = cmp[cmp["category"] == "all"].set_index("metric")
    # By the fixture's script: the full view goes from 8/24 to 16/24 right, 8 samples flip to right, none back.
    full = allc.loc["acc_full"]
    assert (full["a"], full["b"], full["n"]) == (8 / 24, 16 / 24, 24)
    assert full["diff"] == pytest.approx(8 / 24)
    assert (full["a_only"], full["b_only"]) == (0, 8)
    assert full["mcnemar_p"] == pytest.approx(2 * 0.5**8)  # exact binomial, two-sided, 8 vs 0
    crop = allc.loc["acc_crop"]
    assert crop["diff"] == 0 and crop["mcnemar_p"] == 1.0 and crop["ci_low"] == crop["ci_high"] == 0
    gap = allc.loc["gap"]
    assert gap["diff"] == pytest.approx(gap["b"] - gap["a"]) and gap["diff"] == pytest.approx(-8 / 24)
    assert pd.isna(gap["mcnemar_p"]) and pd.isna(gap["a_only"])
    # The decomposition holds in each run and in the difference.
    for col in ("a", "b", "diff"):
        assert allc.loc["gap", col] == pytest.approx(allc.loc["gap_locate", col] + allc.loc["gap_zoom", col])

    md = (out / "compare.md").read_text()
    # the runs' folders, not their model (both could be one); distill's before/ and after/ with their parent's
    assert f"# Comparison: {runs.name}/before → {runs.name}/after" in md
    assert "| acc_full | 33.3 | 66.7 | +33.3 [" in md


def _rec(sample: int, view: str, right: bool | None, bench: str = "b", error: str | None = None,
         category: str = "c") -> Record:
    return Record(key=f"{bench}-{sample}-{view}", benchmark=bench, sample_id=f"s{sample}", view=view, answer="A",
                  parsed=None if error else ("A" if right else "B"), correct=None if error else bool(right),
                  error=error, error_kind="backend" if error else None, category=category)


def test_partial_overlap_is_paired_on_shared_valid_samples():
    a = [_rec(i, v, right=(i % 2 == 0) or v == "crop") for i in range(10) for v in ("full", "crop")]
    a.append(_rec(0, "full", True, bench="only-a"))
    # B lacks samples 0-1, has a backend error on s2's full view, and gets every full view right.
    b = [_rec(i, v, right=True) for i in range(2, 10) for v in ("full", "crop")]
    b = [_rec(2, "full", None, error="timeout") if (r.sample_id, r.view) == ("s2", "full") else r for r in b]
    cmp = compare_records(a, b, seed=3).set_index(["benchmark", "category", "metric"])
    assert "only-a" not in cmp.index.get_level_values(0)

    full = cmp.loc[("b", "all", "acc_full")]
    shared = [i for i in range(3, 10)]  # s3..s9: in both, full view valid in both
    assert full["n"] == len(shared) == 7 and full["n_a"] == 10 and full["n_b"] == 7
    assert full["a"] == sum(i % 2 == 0 for i in shared) / 7 == 3 / 7
    assert full["b"] == 1.0 and full["b_only"] == 4 and full["a_only"] == 0
    assert full["mcnemar_p"] == pytest.approx(2 * 0.5**4)

    gap = cmp.loc[("b", "all", "gap")]  # crop − full, on samples valid in both views in both runs
    assert gap["n"] == 7 and gap["a"] == pytest.approx(4 / 7) and gap["b"] == 0.0
    assert gap["ci_low"] <= gap["diff"] <= gap["ci_high"]
    # Same seed, same numbers.
    pd.testing.assert_frame_equal(compare_records(a, b, seed=3).set_index(["benchmark", "category", "metric"]), cmp)


def test_compare_dirs_names_unshared_benchmarks_and_rejects_bad_folders(runs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    recs = read_records(runs / "after" / "samples.jsonl")
    extra = json.loads(Record(key="x", benchmark="extra", sample_id="1", view="full", correct=True,
                              parsed="A").to_json())
    with (other / "samples.jsonl").open("w") as f:
        for r in recs[: len(recs) // 2] + [extra]:
            f.write(json.dumps(r) + "\n")
    res = compare_dirs(runs / "before", other, tmp_path / "out")
    assert res.only_b == ["extra"] and res.only_a == []
    assert res.label_b == "other"  # no run.json: the folder names it
    md = res.files["md"].read_text()
    assert "Only in B (not compared): extra." in md
    assert "shared of 24 (A)" in md

    with pytest.raises(VopdError, match="report folder not found"):
        compare_dirs(tmp_path / "missing", other)
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "samples.jsonl").write_text('{"key": "a", "benchmark": "b"}\n{"key": "tr')
    with pytest.raises(VopdError, match="line 2 is not valid JSON"):
        compare_dirs(runs / "before", tmp_path / "torn", tmp_path / "out2")


def test_same_run_compares_to_zero(runs):
    recs = read_records(runs / "before" / "samples.jsonl")
    cmp = compare_records(recs, recs)
    assert (cmp["diff"] == 0).all() and (cmp["a"] == cmp["b"]).all()
    acc = cmp[cmp["metric"].str.startswith("acc_")]
    assert (acc["mcnemar_p"] == 1.0).all() and (acc["a_only"] == 0).all()
    # A parse failure (s005's crop) counts as wrong, as in the summary.
    assert analysis.records_frame(recs).query("sample_id == 's005' and view == 'crop'")["right"].item() is False


def test_training_curves_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    real_savefig = Figure.savefig

    def keep(fig, *args, **kw):
        saved.append(fig)
        return real_savefig(fig, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    steps = list(range(60))
    history = [{"step": s, "loss": 1.0 / (1 + s), "lr": 1e-5 * min(1, s / 10)} for s in steps]
    evals = (0, 20, 40, 59)
    history += [{"step": s, "gap": 0.3 - s / 400} for s in evals]  # a sparse evaluation
    path = plot_training_curves(history, tmp_path / "curves.png", title="distill")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The data read back from the figure that was saved: one panel per key, in first-seen order.
    [fig] = saved
    assert fig.get_suptitle() == "distill"
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 3 and all(ax.get_xlabel() == "step" for ax in panels)
    loss, lr, gap = panels
    assert "(pp)" in gap.get_title() and "(pp)" not in loss.get_title()
    raw_loss = loss.get_lines()[0]  # the faint raw series under the moving average
    assert list(raw_loss.get_xdata()) == steps
    assert list(raw_loss.get_ydata()) == pytest.approx([1.0 / (1 + s) for s in steps])
    assert loss.get_yscale() == "linear"  # 1 → 1/60 is not orders of magnitude
    [lr_line] = lr.get_lines()  # a schedule is drawn exactly, unsmoothed
    assert list(lr_line.get_ydata()) == pytest.approx([1e-5 * min(1, s / 10) for s in steps])
    gap_line = gap.get_lines()[0]
    assert list(gap_line.get_xdata()) == list(evals)
    assert list(gap_line.get_ydata()) == pytest.approx([100 * (0.3 - s / 400) for s in evals])  # in points
    saved.clear()
    assert plot_training_curves([{"step": 1}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_default_folder_is_under_runs_and_named_for_the_runs(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["compare", str(runs / "before"), str(runs / "after"), "-q", "--n-boot", "50"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / "compare" / f"{runs.name}-before_vs_{runs.name}-after"
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.md", "compare.png"]
