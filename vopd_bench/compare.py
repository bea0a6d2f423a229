"""Comparing two runs on the samples they share: before/after distillation, or two models.

Records are matched by (benchmark, sample_id, view); only valid (error-free) records count, and a parse
failure is wrong, exactly as in the summary. For each benchmark and category (`all` = the whole benchmark):

- `acc_<view>`: accuracy of A and of B on the samples valid in that view in both runs; `diff` = B − A with a
  paired-bootstrap 95% interval, the discordant counts (`a_only` right, `b_only` right) and the exact McNemar p.
- `gap`, `gap_locate`, `gap_zoom`: each run's gap on the samples valid in every shared view in both runs,
  computed as the summary computes it, and `diff` = gap_B − gap_A with a paired-bootstrap interval (samples
  resampled jointly across the two runs). No McNemar test applies to a difference of differences.

When both runs hold the same samples, `a` and `b` equal the `value` of the same metric in each run's summary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vopd_bench import analysis, stats
from vopd_bench.analysis import ALL, CANONICAL_VIEWS, GAP_METRICS, RecordLike
from vopd_bench.errors import VopdError, writing_to

COMPARE_COLUMNS = ["benchmark", "category", "metric", "a", "b", "diff", "ci_low", "ci_high", "n", "n_a", "n_b",
                   "a_only", "b_only", "mcnemar_p"]
NAN = stats.NAN


def _row(bench: str, cat: str, metric: str, **kw: float) -> dict:
    row = dict.fromkeys(COMPARE_COLUMNS, NAN)
    row.update(benchmark=bench, category=cat, metric=metric, **kw)
    return row


def _gap_values(right: dict[str, np.ndarray], views: Sequence[str]) -> dict[str, float]:
    """The gaps of one run over paired samples, the way `analysis` computes them (bit for bit)."""
    n = len(next(iter(right.values())))
    sums = {v: int(right[v].sum()) for v in views}
    values = {name: (sums[a] - sums[b]) / n for name, (a, b) in GAP_METRICS.items() if a in views and b in views}
    if "gap_locate" in values and "gap_zoom" in values:
        values["gap"] = values["gap_locate"] + values["gap_zoom"]
    return values


def _view_rows(bench: str, cat: str, ta: pd.DataFrame, tb: pd.DataFrame, views: list[str], n_boot: int,
               seed: int) -> list[dict]:
    rows = []
    shared = ta.index.intersection(tb.index)
    for v in views:
        both = shared[ta.loc[shared, f"ok_{v}"].to_numpy() & tb.loc[shared, f"ok_{v}"].to_numpy()]
        x = ta.loc[both, f"right_{v}"].to_numpy(dtype=np.int64)
        y = tb.loc[both, f"right_{v}"].to_numpy(dtype=np.int64)
        n_a, n_b = int(ta[f"ok_{v}"].sum()), int(tb[f"ok_{v}"].sum())
        if len(both) == 0:
            rows.append(_row(bench, cat, f"acc_{v}", n=0, n_a=n_a, n_b=n_b))
            continue
        est = stats.paired_diff(y, x, n_boot=n_boot, seed=seed)
        t = stats.transitions(x, y)  # first = A, second = B: "recoverable" = right in B only
        rows.append(_row(bench, cat, f"acc_{v}", a=int(x.sum()) / len(x), b=int(y.sum()) / len(y), diff=est.value,
                         ci_low=est.ci_low, ci_high=est.ci_high, n=len(x), n_a=n_a, n_b=n_b,
                         a_only=t.second_only_failure, b_only=t.recoverable,
                         mcnemar_p=stats.mcnemar_exact(t.recoverable, t.second_only_failure)))
    return rows


def _gap_rows(bench: str, cat: str, ta: pd.DataFrame, tb: pd.DataFrame, views: list[str], n_boot: int,
              seed: int) -> list[dict]:
    names = [name for name, (a, b) in GAP_METRICS.items() if a in views and b in views]
    if not names:
        return []
    ok_a = ta[[f"ok_{v}" for v in views]].all(axis=1)
    ok_b = tb[[f"ok_{v}" for v in views]].all(axis=1)
    both = ok_a[ok_a].index.intersection(ok_b[ok_b].index)
    n_a, n_b = int(ok_a.sum()), int(ok_b.sum())
    if len(both) == 0:
        return [_row(bench, cat, name, n=0, n_a=n_a, n_b=n_b) for name in names]
    ra = {v: ta.loc[both, f"right_{v}"].to_numpy(dtype=np.int64) for v in views}
    rb = {v: tb.loc[both, f"right_{v}"].to_numpy(dtype=np.int64) for v in views}
    ga, gb = _gap_values(ra, views), _gap_values(rb, views)
    # One joint resample of samples for every gap of both runs: columns = A's views, then B's views.
    reps = stats.bootstrap_means(np.column_stack([ra[v] for v in views] + [rb[v] for v in views]),
                                 n_boot=n_boot, seed=seed)
    col_a = {v: i for i, v in enumerate(views)}
    col_b = {v: len(views) + i for i, v in enumerate(views)}
    rows = []
    for name in names:
        hi_v, lo_v = GAP_METRICS[name]
        d_reps = (reps[:, col_b[hi_v]] - reps[:, col_b[lo_v]]) - (reps[:, col_a[hi_v]] - reps[:, col_a[lo_v]])
        lo, hi = stats.percentile_ci(d_reps)
        rows.append(_row(bench, cat, name, a=ga[name], b=gb[name], diff=gb[name] - ga[name], ci_low=lo, ci_high=hi,
                         n=len(both), n_a=n_a, n_b=n_b))
    return rows


def compare_records(records_a: Iterable[RecordLike], records_b: Iterable[RecordLike], *, n_boot: int = 2000,
                    seed: int = 0) -> pd.DataFrame:
    """Paired comparison of run B against run A (columns `COMPARE_COLUMNS`; see the module docstring).

    Benchmarks present in only one run are left out (`compare_dirs` names them). Deterministic for a seed.
    """
    fa, fb = analysis.records_frame(records_a), analysis.records_frame(records_b)
    rows: list[dict] = []
    if not fa.empty and not fb.empty:
        for bench in sorted(set(fa["benchmark"]) & set(fb["benchmark"])):
            da, db = fa[fa["benchmark"] == bench], fb[fb["benchmark"] == bench]
            views_a, views_b = analysis.ordered_views(da["view"].unique()), analysis.ordered_views(db["view"].unique())
            ta, tb = analysis.sample_table(da, views_a), analysis.sample_table(db, views_b)
            views = [v for v in views_a if v in views_b]
            # As in the summary: the gaps are taken over the canonical views that answered at least once.
            gap_views = [v for v in CANONICAL_VIEWS if v in views and ta[f"ok_{v}"].any() and tb[f"ok_{v}"].any()]
            cats = [ALL] + sorted(str(c) for c in ta["category"].dropna().unique())
            for cat in cats:
                sa = ta if cat == ALL else ta[ta["category"] == cat]
                sb = tb if cat == ALL else tb[tb.index.isin(sa.index)]
                rows += _view_rows(bench, cat, sa, sb, views, n_boot, seed)
                if "full" in gap_views and len(gap_views) > 1:
                    rows += _gap_rows(bench, cat, sa, sb, gap_views, n_boot, seed)
    out = pd.DataFrame(rows, columns=COMPARE_COLUMNS)
    return out.astype({c: float for c in ("a", "b", "diff", "ci_low", "ci_high", "mcnemar_p")})


# ---- folders, files ----------------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[dict]:
    """The records of a samples.jsonl, read only (the file is never rewritten here)."""
    path = Path(path)
    if not path.is_file():
        raise VopdError(f"no samples.jsonl in {path.parent} (is it a gap-report folder?)")
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise VopdError(f"{path} line {i} is not valid JSON (a run still writing? rerun gap-report to "
                                "finish it)") from None
            if not isinstance(rec, dict):
                raise VopdError(f"{path} line {i} is not a record")
            out.append(rec)
    return out


@dataclass
class Comparison:
    table: pd.DataFrame
    label_a: str
    label_b: str
    only_a: list[str]  # benchmarks only run A has
    only_b: list[str]
    files: dict[str, Path]



def render_markdown(cmp: pd.DataFrame, label_a: str, label_b: str, only_a: Sequence[str] = (),
                    only_b: Sequence[str] = ()) -> str:
    from vopd_bench.report import DASH, fmt_acc, fmt_gap, fmt_p

    def fin(x: float) -> bool:
        return isinstance(x, float) and math.isfinite(x)

    def cnt(x: float) -> str:
        return str(int(x)) if fin(float(x)) else DASH

    out = [f"# Comparison: {label_a} → {label_b}", "",
           f"A = `{label_a}`, B = `{label_b}`. Paired on the samples both runs answered validly: accuracies in %, "
           "gaps and differences in percentage points, 95% paired-bootstrap intervals, exact McNemar p on the "
           "discordant samples (A only right vs B only right).", ""]
    header = ["metric", "A", "B", "B − A [95% CI]", "n shared", "A only right", "B only right", "McNemar p"]
    for cat_title, part in (("", cmp[cmp["category"] == ALL]), (" by category", cmp[cmp["category"] != ALL])):
        for bench, rows in part.groupby("benchmark", sort=True):
            out += [f"## {bench}{cat_title}", ""]
            first = ["category"] if cat_title else []
            out += ["| " + " | ".join(first + header) + " |", "|" + "|".join("---" for _ in first + header) + "|"]
            for r in rows.itertuples(index=False):
                is_acc = r.metric.startswith("acc_")
                val = fmt_acc if is_acc else fmt_gap
                cells = ([r.category] if cat_title else []) + [
                    r.metric, val(r.a), val(r.b), fmt_gap(r.diff, r.ci_low, r.ci_high), cnt(r.n),
                    cnt(r.a_only) if is_acc else DASH, cnt(r.b_only) if is_acc else DASH, fmt_p(r.mcnemar_p)]
                out.append("| " + " | ".join(str(c) for c in cells) + " |")
            out.append("")
    if cmp.empty:
        out += ["No benchmark is shared by the two runs.", ""]
    notes = []
    if only_a:
        notes.append(f"Only in A (not compared): {', '.join(only_a)}.")
    if only_b:
        notes.append(f"Only in B (not compared): {', '.join(only_b)}.")
    unshared = cmp[(cmp["category"] == ALL) & ((cmp["n"] < cmp["n_a"]) | (cmp["n"] < cmp["n_b"]))]
    for r in unshared.itertuples(index=False):
        notes.append(f"{r.benchmark} {r.metric}: {int(r.n)} shared of {int(r.n_a)} (A) and {int(r.n_b)} (B) valid.")
    if notes:
        out += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(out)


def write_comparison(cmp: pd.DataFrame, out_dir: str | Path, label_a: str, label_b: str,
                     only_a: Sequence[str] = (), only_b: Sequence[str] = ()) -> dict[str, Path]:
    """compare.csv, compare.md and compare.png in `out_dir`; returns their paths by kind."""
    from vopd_bench.plots_compare import plot_before_after

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": out_dir / "compare.csv", "md": out_dir / "compare.md"}
    cmp.to_csv(files["csv"], index=False)
    files["md"].write_text(render_markdown(cmp, label_a, label_b, only_a, only_b), encoding="utf-8")
    png = plot_before_after(cmp, out_dir / "compare.png", label_a, label_b)
    if png is not None:
        files["png"] = png
    return files


def compare_dirs(dir_a: str | Path, dir_b: str | Path, out_dir: str | Path | None = None, *,
                 label_a: str | None = None, label_b: str | None = None, n_boot: int = 2000,
                 seed: int = 0) -> Comparison:
    """Compare two gap-report folders and write the files (default folder: runs/compare/<A>_vs_<B>). A run is
    called by `label_a`/`label_b`, else by its folder's name (with its parents when both are named alike)."""
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    for d in (dir_a, dir_b):
        if not d.is_dir():
            raise VopdError(f"report folder not found: {d}")
    recs_a, recs_b = read_records(dir_a / "samples.jsonl"), read_records(dir_b / "samples.jsonl")
    from vopd_bench.leaderboard import run_labels

    folder_a, folder_b = run_labels([dir_a, dir_b])
    label_a, label_b = label_a or folder_a, label_b or folder_b
    cmp = compare_records(recs_a, recs_b, n_boot=n_boot, seed=seed)
    benches_a = {str(r.get("benchmark")) for r in recs_a}
    benches_b = {str(r.get("benchmark")) for r in recs_b}
    only_a, only_b = sorted(benches_a - benches_b), sorted(benches_b - benches_a)
    if out_dir is None:
        out_dir = Path("runs") / "compare" / f"{folder_a.replace('/', '-')}_vs_{folder_b.replace('/', '-')}"
    with writing_to(out_dir, resumes=False):
        files = write_comparison(cmp, out_dir, label_a, label_b, only_a, only_b)
    return Comparison(cmp, label_a, label_b, only_a, only_b, files)
