"""vopd leaderboard: measured rows equal their run summaries exactly; the paper's rows are labelled and kept
apart from every measured number."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pandas as pd
import pytest
import report_fixtures as rf
from typer.testing import CliRunner

from vopd_bench import analysis
from vopd_bench.cli_reports import app
from vopd_bench.errors import VopdError
from vopd_bench.leaderboard import (
    build_leaderboard,
    leaderboard,
    load_run,
    read_csv_exact,
    read_summary,
    split_column,
)
from vopd_bench.published import FIG3_GAPS, TABLE1_V1, TABLE1_V2, V2_MEMBERS
from vopd_bench.records import Record

N = 24
BENCH = "local:toyset"


@pytest.fixture
def runs(before_after_runs):
    """The session's two scripted runs (conftest.py): read them, write elsewhere or beside them."""
    assert rf.SHARED_N == N
    return before_after_runs


def _summary_value(run_dir, metric: str, bench: str = BENCH, cat: str = "all") -> pd.Series:
    s = read_summary(run_dir / "summary.csv")
    return s[(s["benchmark"] == bench) & (s["category"] == cat) & (s["metric"] == metric)].iloc[0]


def _wilson_half_width(k: int, n: int, z: float = 1.959963984540054) -> float:
    p = k / n
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


def test_cli_writes_files_and_values_equal_the_summaries(runs):
    out = runs / "lb" / "leaderboard.csv"
    res = CliRunner().invoke(app, ["leaderboard", str(runs / "before"), str(runs / "after"), "--out", str(out),
                                   "--with-published", "-q"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and out.with_suffix(".md").is_file()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    df = read_csv_exact(out, keep_default_na=False, na_values=[""])
    measured = df[df["source"] == "measured"].set_index("model")
    assert list(measured.index) == ["toy-before", "toy-after"]
    for model, outcome in (("toy-before", rf.before), ("toy-after", rf.after)):
        run_dir = runs / model.removeprefix("toy-")
        row = measured.loc[model]
        assert row["run"] == str(run_dir)
        for view in ("full", "crop", "box"):
            src = _summary_value(run_dir, f"acc_{view}")
            assert row[f"{BENCH}:{view}"] == src["value"]  # exactly, not approximately
            # ...and the summary itself holds the script's accuracy (a parse failure counts as wrong).
            k = rf.count_right(outcome, view, range(N))
            assert src["value"] == k / N
            # The CI column is the Wilson 95% half-width of k/N, written out here.
            assert row[f"{BENCH}:{view}:ci"] == pytest.approx(_wilson_half_width(k, N), rel=1e-9)
        for gap in ("gap", "gap_locate", "gap_zoom"):
            src = _summary_value(run_dir, gap)
            assert row[f"{BENCH}:{gap}"] == src["value"]
            assert row[f"{BENCH}:{gap}:ci"] == (src["ci_high"] - src["ci_low"]) / 2
        assert row[f"{BENCH}:n"] == N and row[f"{BENCH}:n_paired"] == _summary_value(run_dir, "gap")["n"] == N
        # No headline average: the run has none of the paper's benchmarks.
        assert all(pd.isna(row[c]) for c in df.columns if c.startswith("avg_"))
        # Published columns stay empty on measured rows.
        assert pd.isna(row["vstar:full"]) and pd.isna(row["zoombench:gap"])

    md = out.with_suffix(".md").read_text()
    measured_part, _, published_part = md.partition("## Published")
    assert "toy-before" in measured_part and "(paper" not in measured_part
    assert "toy-before" not in published_part
    # 8 of 24 right on the full image before, 16 after (see report_fixtures); CI half-widths alongside.
    # Rows are called by their run (the folder's name; distill's before/ and after/ with their parent's), not by
    # the model; the model is listed with its folder.
    before, after = f"{runs.name}/before", f"{runs.name}/after"
    assert list(measured["label"]) == [before, after]
    assert f"| {before} | 33.3 ± " in measured_part and f"| {after} | 66.7 ± " in measured_part
    assert f"| {before} | toy-before | {runs / 'before'} |" in measured_part


def test_rows_are_named_by_run_or_label(runs, tmp_path):
    """Two runs of one model in folders of one name stay apart (their parent folders are added), and --label
    names the rows outright: in the CSV, the markdown, the terminal table and the chart's legend."""
    import shutil

    from figure_layout import capture_figures

    for parent in ("a", "b"):
        shutil.copytree(runs / "before", tmp_path / parent / "toy")
    out = tmp_path / "lb.csv"
    with capture_figures() as figs:
        res = CliRunner().invoke(app, ["leaderboard", str(tmp_path / "a" / "toy"), str(tmp_path / "b" / "toy"),
                                       "--out", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert list(df["label"]) == ["a/toy", "b/toy"] and list(df["model"]) == ["toy-before", "toy-before"]
    assert "│ a/toy │" in res.output and "│ b/toy │" in res.output
    [fig] = figs
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a/toy", "b/toy"]

    res = CliRunner().invoke(app, ["leaderboard", str(tmp_path / "a" / "toy"), str(tmp_path / "b" / "toy"),
                                   "--out", str(out), "--label", "first", "-l", "second", "-q"])
    assert res.exit_code == 0, res.output
    assert list(pd.read_csv(out)["label"]) == ["first", "second"]
    assert "| first | 33.3 ± " in out.with_suffix(".md").read_text()
    res = CliRunner().invoke(app, ["leaderboard", str(tmp_path / "a" / "toy"), "--out", str(out), "--label", "x",
                                   "--label", "y"])
    assert res.exit_code != 0 and "one per folder" in str(res.exception)


def test_published_rows_are_labelled_and_converted(runs):
    with_pub = build_leaderboard([load_run(runs / "before")], with_published=True)
    pub = with_pub[with_pub["source"] == "published"].set_index("model")
    assert len(pub) == len(TABLE1_V1) + len(TABLE1_V2) + len(FIG3_GAPS) == 38
    assert all("(paper " in m for m in pub.index)
    assert set(pub["source_ref"]) == {"paper v1 Table 1 [v1], paper.md §6.1", "paper v2 Table 1 [v2*], paper.md §6.1b",
                                      "paper v1 Fig. 3 [v1], paper.md §1"}
    # Fractions, as measured numbers are (paper.md §6.1, §6.1b, §1).
    assert pub.loc["Qwen3.5-4B (paper v1 Table 1)", "vstar:full"] == 0.8429
    assert pub.loc["Qwen3.5-4B (paper v1 Table 1)", "mme-realworld-lite:full"] == 0.358
    assert pub.loc["Qwen3.5-4B (paper v2 Table 1)", "mme-realworld:full"] == 0.6386
    assert pub.loc["Vision-OPD-9B (paper v2 Table 1)", "avg_v2:full"] == 0.7968
    assert pub.loc["Qwen3.5-4B (paper v1 Fig. 3)", "zoombench:gap"] == 0.217
    assert pd.isna(pub.loc["Qwen3.5-4B (paper v1 Table 1)", "mme-realworld:full"])  # v1 has Lite, not EN
    assert pd.isna(pub.loc["Qwen3.5-4B (paper v1 Table 1)", f"{BENCH}:full"])

    # Adding published rows changes no measured cell.
    without = build_leaderboard([load_run(runs / "before")])
    assert (without["source"] == "measured").all()
    measured = with_pub[with_pub["source"] == "measured"][without.columns]
    pd.testing.assert_frame_equal(measured.reset_index(drop=True), without)


@pytest.mark.parametrize("table", [TABLE1_V1, TABLE1_V2[:4]], ids=["v1", "v2-exact"])
def test_published_averages_match_their_members(table):
    """A transcription check: every full row's Avg is the mean of its six values, to the paper's rounding."""
    for r in table:
        v = r.fractions()
        avg_key = next(k for k in v if k.startswith("avg_"))
        members = [x for k, x in v.items() if not k.startswith("avg_")]
        assert len(members) == 6
        assert abs(sum(members) / 6 - v[avg_key]) <= 0.00005 + 1e-12, r.label


def _records(bench: str, outcomes: dict[str, list[int]]) -> list[Record]:
    out = []
    for view, rights in outcomes.items():
        for i, right in enumerate(rights):
            out.append(Record(key=f"{bench}-{i}-{view}", benchmark=bench, sample_id=str(i), view=view, answer="A",
                              parsed="A" if right else "B", correct=bool(right), evidence_area=0.01))
    return out


def test_headline_average_needs_all_six_members_and_ignores_published(tmp_path):
    """A run on the paper's v2 benchmark set gets its average; published rows never enter it."""
    records = []
    accs = {}
    for k, bench in enumerate(V2_MEMBERS):
        full = [1 if i < 3 + k else 0 for i in range(10)]  # 3/10, 4/10, ... 8/10
        records += _records(bench, {"full": full, "crop": [1] * 10})
        accs[bench] = sum(full) / 10
    run_dir = tmp_path / "paperset"
    run_dir.mkdir()
    analysis.summarize(records).to_csv(run_dir / "summary.csv", index=False)
    (run_dir / "run.json").write_text(json.dumps({"model": "m"}))

    df, _ = leaderboard([run_dir], tmp_path / "lb.csv", with_published=True)
    row = df[df["source"] == "measured"].iloc[0]
    assert row["avg_v2:full"] == pytest.approx(sum(accs.values()) / 6, abs=1e-15)
    assert row["avg_v2:full"] == pytest.approx((0.3 + 0.4 + 0.5 + 0.6 + 0.7 + 0.8) / 6)
    assert row["avg_v2:crop"] == 1.0
    assert pd.isna(row["avg_v1:full"])  # no mme-realworld-lite in this run
    assert row["zoombench:full"] == 0.4

    # A headline row stored in the summary (the runner writes one, benchmark `average`) is copied as is; a
    # member that ran only as a prompt variant (`name@variant`) still counts for the computed views.
    variant = [replace(r, benchmark="hrbench-4k@lmms") if r.benchmark == "hrbench-4k" else r for r in records]
    summary = analysis.summarize(variant)
    stored = {"benchmark": "average", "category": "all", "metric": "acc_full", "value": 0.123, "ci_low": math.nan,
              "ci_high": math.nan, "n": 60}
    pd.concat([summary, pd.DataFrame([stored])]).to_csv(run_dir / "summary.csv", index=False)
    row = build_leaderboard([load_run(run_dir)]).iloc[0]
    assert row["avg_v2:full"] == 0.123 and row["avg_v2:crop"] == 1.0
    assert "average:full" not in row.index  # an aggregate is not a benchmark column

    # Dropping one member drops the average; the paper's rows for that benchmark do not fill it in.
    part = [r for r in records if r.benchmark != "hrbench-8k"]
    analysis.summarize(part).to_csv(run_dir / "summary.csv", index=False)
    df2 = build_leaderboard([load_run(run_dir)], with_published=True)
    row2 = df2[df2["source"] == "measured"].iloc[0]
    assert pd.isna(row2["avg_v2:full"]) and pd.isna(row2["hrbench-8k:full"])


def test_column_names_and_bad_input(tmp_path):
    assert split_column("local:my.jsonl:gap_zoom:ci") == ("local:my.jsonl", "gap_zoom:ci")
    assert split_column("vstar:full") == ("vstar", "full")
    assert split_column("avg_v1:full") is None and split_column("model") is None
    with pytest.raises(VopdError, match="report folder not found"):
        leaderboard([tmp_path / "nope"], tmp_path / "lb.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VopdError, match="no summary.csv"):
        leaderboard([tmp_path / "empty"], tmp_path / "lb.csv")
    with pytest.raises(VopdError, match="at least one"):
        leaderboard([], tmp_path / "lb.csv")
