"""Leaderboards: one row per gap-report run, read from each report folder's summary.csv and run.json.

Columns (all fractions, like summary.csv):
- `label` (what tables and the chart call the row: the run's folder name, or `--label`; a published row's model),
  `model`, `source` (`measured` or `published`), `source_ref`, `note`, `run` (the report folder);
- per benchmark `b` and view `v`: `b:v` (accuracy, category `all`) and `b:v:ci` (half the 95% interval width);
- `b:gap`, `b:gap_locate`, `b:gap_zoom` with their `:ci`; `b:n` (samples) and `b:n_paired` (samples behind
  the gaps);
- `avg_v1:v` / `avg_v2:v`: the paper's headline average (unweighted mean of its six fine-grained benchmarks,
  `vopd_bench.published.AVERAGES`), only when the run has all six; for the full view it is the summary's own
  `average-v1` / `average` row when the summary has one.

Measured values are copied from summary.csv unchanged (the CSV round-trips floats exactly). Published rows
(`--with-published`) come from `vopd_bench.published`, are labelled with their table, and never enter a
measured row or a measured average.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from vopd_bench.analysis import ALL, CANONICAL_VIEWS
from vopd_bench.errors import VopdError, writing_to
from vopd_bench.published import AVERAGES, PAPER_BENCHMARKS, printed, published_rows

ID_COLUMNS = ["label", "model", "source", "source_ref", "note", "run"]
GAPS = ("gap", "gap_locate", "gap_zoom")
MEASURED, PUBLISHED = "measured", "published"
# The benchmark name under which summary.csv stores each headline average (vopd_bench.benchmarks.metrics).
SUMMARY_AVERAGE = {"avg_v1": "average-v1", "avg_v2": "average"}
# The published models worth a bar next to a measured run: the backbones and their distilled versions.
CHART_PUBLISHED = ("Qwen3.5-4B", "Qwen3.5-9B", "Vision-OPD-4B", "Vision-OPD-9B")


@dataclass
class RunSummary:
    """A finished gap-report folder: its tidy summary and its run.json."""

    path: Path
    model: str
    summary: pd.DataFrame
    run_info: dict = field(default_factory=dict)


# pandas 3 reads floats back round-trip exactly by default (and deprecates the option); pandas 2 needs it.
_EXACT_FLOATS: dict = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}


def read_csv_exact(path: str | Path, **kwargs) -> pd.DataFrame:
    """pd.read_csv with floats read back bit-exact, as `DataFrame.to_csv` wrote them."""
    return pd.read_csv(path, **_EXACT_FLOATS, **kwargs)


def read_summary(path: str | Path) -> pd.DataFrame:
    """summary.csv as written by the runner, floats read back bit-exact."""
    path = Path(path)
    if not path.is_file():
        raise VopdError(f"no summary.csv in {path.parent} (is it a gap-report folder?)")
    try:
        df = read_csv_exact(path, keep_default_na=False,
                         na_values={"value": ["", "nan", "NaN"], "ci_low": ["", "nan", "NaN"],
                                    "ci_high": ["", "nan", "NaN"]},
                         dtype={"benchmark": str, "category": str, "metric": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise VopdError(f"{path} is not a readable summary: {str(e).splitlines()[0]}") from None
    missing = [c for c in ("benchmark", "category", "metric", "value", "ci_low", "ci_high", "n") if c not in df]
    if missing:
        raise VopdError(f"{path} lacks column(s) {', '.join(missing)}")
    return df


def load_run(report_dir: str | Path) -> RunSummary:
    report_dir = Path(report_dir)
    if not report_dir.is_dir():
        raise VopdError(f"report folder not found: {report_dir}")
    summary = read_summary(report_dir / "summary.csv")
    info: dict = {}
    info_path = report_dir / "run.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise VopdError(f"{info_path} is not valid JSON: {e}") from None
    model = str(info.get("model") or report_dir.resolve().name)
    return RunSummary(report_dir, model, summary, info)


# The gap-report folders `vopd distill` writes in its --out: named for their place, so their parent names the run.
DISTILL_RUNS = ("before", "after")


def run_labels(report_dirs: Sequence[str | Path]) -> list[str]:
    """A name per run for tables and charts: its folder's name (with its parent for distill's `before`/`after`:
    `toy-distill/after`), with as many parent folders as it takes to tell runs apart (`a/toy`, `b/toy`); the same
    folder given twice keeps one name."""
    parts = [Path(d).resolve().parts for d in report_dirs]
    depth = {p: 2 if p[-1] in DISTILL_RUNS and len(p) > 1 else 1 for p in parts}
    while True:
        names = {p: "/".join(p[-depth[p]:]) for p in parts}
        clash = [p for p in depth if sum(names[q] == names[p] for q in depth) > 1 and depth[p] < len(p)]
        if not clash:
            return [names[p] for p in parts]
        for p in clash:
            depth[p] += 1


def _half_width(lo: float, hi: float) -> float:
    return (hi - lo) / 2 if math.isfinite(lo) and math.isfinite(hi) else math.nan


def run_benchmarks(summary: pd.DataFrame) -> list[str]:
    """The benchmarks a summary reports on (those with an `n_samples` row); aggregates have none."""
    return sorted(summary.loc[(summary["metric"] == "n_samples") & (summary["category"] == ALL),
                              "benchmark"].unique())


def measured_row(run: RunSummary, label: str | None = None) -> dict:
    """The leaderboard row of one run (named `label`, else its folder); values taken from its summary as they are."""
    s = run.summary[run.summary["category"] == ALL]
    by = {(r.benchmark, r.metric): r for r in s.itertuples(index=False)}
    row: dict = {"label": label or run.path.resolve().name, "model": run.model, "source": MEASURED,
                 "source_ref": "", "note": "", "run": str(run.path)}
    for b in run_benchmarks(run.summary):
        for v in CANONICAL_VIEWS:
            r = by.get((b, f"acc_{v}"))
            if r is not None and r.n > 0:
                row[f"{b}:{v}"] = float(r.value)
                row[f"{b}:{v}:ci"] = _half_width(r.ci_low, r.ci_high)
        for g in GAPS:
            r = by.get((b, g))
            if r is not None:
                row[f"{b}:{g}"] = float(r.value)
                row[f"{b}:{g}:ci"] = _half_width(r.ci_low, r.ci_high)
        row[f"{b}:n"] = int(by[(b, "n_samples")].value)
        if (b, "gap") in by:
            row[f"{b}:n_paired"] = int(by[(b, "gap")].n)
    benches = run_benchmarks(run.summary)
    for name, members in AVERAGES.items():
        # The runner stores the full-view headline as its own summary rows; copy those rather than recompute.
        stored = by.get((SUMMARY_AVERAGE[name], "acc_full"))
        for v in CANONICAL_VIEWS:
            if v == "full" and stored is not None and math.isfinite(stored.value):
                row[f"{name}:full"] = float(stored.value)
                continue
            vals = [row.get(f"{b}:{v}") if b else None for b in (_member(m, benches) for m in members)]
            if all(x is not None and math.isfinite(x) for x in vals):
                row[f"{name}:{v}"] = sum(vals) / len(vals)
    return row


def _member(name: str, benches: Sequence[str]) -> str | None:
    """The run's benchmark standing for a headline member: the member itself, or its one prompt variant
    (`hrbench-4k@...`) when only that ran (the same rule as the runner's stored average)."""
    if name in benches:
        return name
    variants = [b for b in benches if b.startswith(name + "@")]
    return variants[0] if len(variants) == 1 else None


# Per-benchmark column suffixes, in display order.
SUFFIXES = (*(s for v in CANONICAL_VIEWS for s in (v, f"{v}:ci")), *(s for g in GAPS for s in (g, f"{g}:ci")),
            "n", "n_paired")


def split_column(column: str) -> tuple[str, str] | None:
    """`vstar:full:ci` -> ("vstar", "full:ci"); `local:my.jsonl:gap` -> ("local:my.jsonl", "gap"); None for
    identity and average columns. Benchmark names may hold a colon, so the suffix is matched, not split."""
    if column in ID_COLUMNS or column.startswith("avg_"):
        return None
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if column.endswith(":" + s):
            return column[: -len(s) - 1], s
    return None


def benchmarks_of(df: pd.DataFrame) -> list[str]:
    """The benchmarks that have a column in a leaderboard frame, in column order."""
    return list(dict.fromkeys(sc[0] for c in df.columns if (sc := split_column(c)) is not None))


def _column_order(columns: Sequence[str], benches: Sequence[str]) -> list[str]:
    order = list(ID_COLUMNS)
    for b in benches:
        order += [f"{b}:{s}" for s in SUFFIXES]
    for name in AVERAGES:
        order += [f"{name}:{v}" for v in CANONICAL_VIEWS]
    present = set(columns)
    return [c for c in order if c in present]


def build_leaderboard(runs: Sequence[RunSummary], *, with_published: bool = False,
                      labels: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per run (measured), named by `labels` (default: `run_labels` of their folders), then, if asked, the
    paper's rows (published, named by their model)."""
    labels = list(labels) if labels is not None else run_labels([r.path for r in runs])
    rows = [measured_row(r, label) for r, label in zip(runs, labels, strict=True)]
    measured_benches = sorted({b for r in runs for b in run_benchmarks(r.summary)})
    benches = list(measured_benches)
    if with_published:
        pub = [{"label": p["model"], **p} for p in published_rows()]
        rows += pub
        in_pub = {sc[0] for p in pub for k in p if (sc := split_column(k)) is not None}
        benches += [b for b in PAPER_BENCHMARKS if b in in_pub and b not in benches]
        benches += sorted(in_pub - set(benches))
    df = pd.DataFrame(rows)
    for c in ID_COLUMNS:
        if c not in df:
            df[c] = ""
    df = df[_column_order(df.columns, benches)]
    for c in df.columns:
        if c.endswith(":n") or c.endswith(":n_paired"):
            df[c] = df[c].astype("Int64")
    return df


# ---- writing ------------------------------------------------------------------------------------------------


def _measured_cell(r: pd.Series, col: str, signed: bool) -> str:
    """A measured value in % or pp with ± half its 95% interval."""
    v, ci = r.get(col), r.get(f"{col}:ci")
    if v is None or pd.isna(v):
        return "–"
    s = f"{v * 100:+.1f}" if signed else f"{v * 100:.1f}"
    return s if ci is None or pd.isna(ci) else f"{s} ± {ci * 100:.1f}"


def _published_cell(r: pd.Series, col: str, signed: bool) -> str:
    """A published value exactly as the paper prints it (its own precision)."""
    v = printed(str(r["model"]), col)
    if v is None:
        return "–"
    return f"+{v}" if signed and not v.startswith("-") else v


def _md_table(rows: pd.DataFrame, columns: list[tuple[str, str]], signed: bool, cell, first: str) -> list[str]:
    """`columns`: (header, leaderboard column); `cell(row, column, signed)` formats one value; `first` heads the
    column of row labels."""
    header = [first, *(h for h, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, r in rows.iterrows():
        cells = [_md_escape(r["label"]), *(cell(r, col, signed) for _, col in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


_VIEW_TITLES = (("full", "Accuracy, full image (%)"), ("crop", "Accuracy, evidence crop (%)"),
                ("box", "Accuracy, full + red box (%)"))
_GAP_TITLES = (("gap", "Gap, crop − full (pp)"), ("gap_locate", "Where to look, box − full (pp)"),
               ("gap_zoom", "How closely, crop − box (pp)"))


def _md_escape(x: object) -> str:
    return str(x).replace("|", "\\|")


def _section(part: pd.DataFrame, cell, first: str = "run") -> list[str]:
    """The accuracy and gap tables of one group of rows, leaving out tables (and rows) with no value."""
    part = part.dropna(axis=1, how="all")
    benches = benchmarks_of(part)
    out: list[str] = []
    for key, title in _VIEW_TITLES + _GAP_TITLES:
        cols = [(b, f"{b}:{key}") for b in benches if f"{b}:{key}" in part]
        cols += [(f"Avg {n[-2:]}", f"{n}:{key}") for n in AVERAGES if f"{n}:{key}" in part]
        if cols:
            rows = part[part[[c for _, c in cols]].notna().any(axis=1)]
            out += [f"### {title}", "", *_md_table(rows, cols, key.startswith("gap"), cell, first), ""]
    return out


def _samples_table(part: pd.DataFrame) -> list[str]:
    benches = [b for b in benchmarks_of(part) if f"{b}:n" in part]
    if not benches:
        return []

    def cell(r: pd.Series, b: str) -> str:
        if pd.isna(r[f"{b}:n"]):
            return "–"
        paired = r.get(f"{b}:n_paired")
        return f"{int(r[f'{b}:n'])}" + ("" if paired is None or pd.isna(paired) else f" ({int(paired)} paired)")

    out = ["### Samples", "", "| run | " + " | ".join(benches) + " |",
           "|" + "|".join("---" for _ in range(len(benches) + 1)) + "|"]
    out += [f"| {_md_escape(r['label'])} | " + " | ".join(cell(r, b) for b in benches) + " |"
            for _, r in part.iterrows()]
    out += ["### Runs", "", "| run | model | folder |", "|---|---|---|"]
    out += [f"| {_md_escape(r['label'])} | {_md_escape(r['model'])} | {_md_escape(r['run'])} |"
            for _, r in part.iterrows()]
    out += [""]
    return out


def render_markdown(df: pd.DataFrame) -> str:
    """leaderboard.md: the measured rows, then each published table in its own section (never mixed)."""
    out = ["# Leaderboard", "",
           "Accuracy in % (± half the 95% interval), gaps in percentage points: gap = crop − full, "
           "where to look = box − full, how closely = crop − box. Avg = the paper's headline average (unweighted "
           "mean of its six fine-grained benchmarks; v1 with MME-RealWorld-Lite, v2 with MME-RealWorld-EN), "
           "shown for a measured run only when it has all six.", ""]
    measured = df[df["source"] == MEASURED]
    if not measured.empty:
        out += ["## Measured", "", *_section(measured, _measured_cell), *_samples_table(measured)]
    published = df[df["source"] == PUBLISHED]
    for ref, part in published.groupby("source_ref", sort=False):
        out += [f"## Published: {ref}", "",
                "The paper's own numbers as printed, not measured by vopd.", "",
                *_section(part, _published_cell, first="model")]
        notes: dict[str, list[str]] = {}
        for _, r in part[part["note"] != ""].iterrows():
            notes.setdefault(r["note"], []).append(str(r["model"]).split(" (paper")[0])
        out += [*(f"- {n}: {', '.join(models)}" for n, models in notes.items()), ""] if notes else []
    return "\n".join(out)


def write_leaderboard(df: pd.DataFrame, out_csv: str | Path) -> dict[str, Path]:
    """Write the CSV, `leaderboard.md` and `leaderboard.png` next to it; returns their paths by kind."""
    from vopd_bench.plots_compare import plot_leaderboard

    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_csv, index=False)
    md = out_csv.with_suffix(".md")
    md.write_text(render_markdown(df), encoding="utf-8")
    written = {"csv": out_csv, "md": md}
    png = plot_leaderboard(df, out_csv.with_suffix(".png"), benchmarks_of(df[df["source"] == MEASURED]),
                           published_models=CHART_PUBLISHED)
    if png is not None:
        written["png"] = png
    return written


def leaderboard(report_dirs: Sequence[str | Path], out_csv: str | Path, *, with_published: bool = False,
                labels: Sequence[str] = ()) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Read the report folders, build the leaderboard and write its files. `labels` name the runs, one per folder
    in order (default: the folders' names)."""
    if not report_dirs:
        raise VopdError("give at least one gap-report folder")
    if labels and len(labels) != len(report_dirs):
        raise VopdError(f"{len(labels)} --label for {len(report_dirs)} folders: give one per folder, in order")
    if labels and len(set(labels)) != len(labels):
        raise VopdError(f"two runs share a --label: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))}")
    runs = [load_run(d) for d in report_dirs]
    df = build_leaderboard(runs, with_published=with_published, labels=list(labels) or None)
    with writing_to(Path(out_csv).parent, resumes=False):
        return df, write_leaderboard(df, out_csv)
