"""report.md: the gap report a person reads, with its PNG figures next to it.

Numbers come from the tidy summary (fractions); the markdown shows accuracies in % and gaps in percentage
points. Records are only used for what the summary does not hold: the views that were run, the most common
error reasons and the number of recoverable failures handed to the trainer.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from vopd_bench import analysis, plots
from vopd_bench.analysis import ALL, AREA_LABELS, AREA_PREFIX, CANONICAL_VIEWS, TRANSITION_METRICS

DASH = "–"
PARSE_FAIL_WARN = 0.10  # a view whose answers fail to parse more often than this gets a warning under the results
FIGURES = {"accuracy.png": "Accuracy per view", "gap.png": "Gap and its parts",
           "gap_by_area.png": "Gap vs evidence size", "focus.png": "Attention share on the evidence vs correctness"}
_CORE = re.compile(
    r"^(n_samples|acc_\w+|gap|gap_locate|gap_zoom|mcnemar_p|both_right|recoverable|crop_only_failure|both_wrong|"
    r"gap_area:.*|parse_fail_\w+|n_errors_\w+|n_sample_errors|n_no_evidence|boxes_clamped|focus_\w+(:.*)?|"
    r"gap_selfzoom|selfzoom_recovery|selfcrop_\w+)$"
)


# ---- formatting -------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def fmt_acc(value: float, lo: float = math.nan, hi: float = math.nan) -> str:
    """0.62, 0.48, 0.74 -> '62.0 [48.1, 74.1]' (percent)."""
    if not _finite(value):
        return DASH
    ci = f" [{lo * 100:.1f}, {hi * 100:.1f}]" if _finite(lo) and _finite(hi) else ""
    return f"{value * 100:.1f}{ci}"


def fmt_gap(value: float, lo: float = math.nan, hi: float = math.nan) -> str:
    """0.136, 0.09, 0.18 -> '+13.6 [+9.0, +18.0]' (percentage points)."""
    if not _finite(value):
        return DASH
    ci = f" [{lo * 100:+.1f}, {hi * 100:+.1f}]" if _finite(lo) and _finite(hi) else ""
    return f"{value * 100:+.1f}{ci}"


def fmt_p(p: float) -> str:
    if not _finite(p):
        return DASH
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_count(x: float) -> str:
    return str(int(x)) if _finite(x) else DASH


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


# ---- summary access ---------------------------------------------------------------------------------------


class _Lookup:
    """Rows of the summary by (benchmark, category, metric)."""

    def __init__(self, summary: pd.DataFrame):
        self.rows = {(r.benchmark, r.category, r.metric): r for r in summary.itertuples(index=False)}

    def get(self, bench: str, cat: str, metric: str) -> Any | None:
        return self.rows.get((bench, cat, metric))

    def value(self, bench: str, cat: str, metric: str) -> float:
        r = self.get(bench, cat, metric)
        return float(r.value) if r is not None else math.nan

    def acc(self, bench: str, cat: str, metric: str) -> str:
        r = self.get(bench, cat, metric)
        return fmt_acc(r.value, r.ci_low, r.ci_high) if r is not None else DASH

    def gap(self, bench: str, cat: str, metric: str) -> str:
        r = self.get(bench, cat, metric)
        return fmt_gap(r.value, r.ci_low, r.ci_high) if r is not None else DASH

    def n(self, bench: str, cat: str, metric: str) -> str:
        r = self.get(bench, cat, metric)
        return fmt_count(r.n) if r is not None else DASH


def _main_cells(look: _Lookup, bench: str, cat: str) -> list[str]:
    paired = next((look.n(bench, cat, m) for m in ("gap", "gap_locate") if look.get(bench, cat, m) is not None), DASH)
    return [
        fmt_count(look.value(bench, cat, "n_samples")),
        *(look.acc(bench, cat, f"acc_{v}") for v in CANONICAL_VIEWS),
        look.gap(bench, cat, "gap"),
        look.gap(bench, cat, "gap_locate"),
        look.gap(bench, cat, "gap_zoom"),
        paired,
        fmt_p(look.value(bench, cat, "mcnemar_p")),
    ]


MAIN_HEADER = ["n", "full %", "crop %", "box %", "gap (crop − full)", "where to look (box − full)",
               "how closely (crop − box)", "paired n", "McNemar p"]


def _fmt_rate(look: _Lookup, bench: str, metric: str) -> str:
    v = look.value(bench, ALL, metric)
    return f"{v * 100:.1f}" if _finite(v) else DASH


# ---- the report -------------------------------------------------------------------------------------------


def render_report(summary: pd.DataFrame, records: Sequence[Any], run_info: dict,
                  figures: Sequence[str] = ()) -> str:
    """The markdown text of the report (pure; `figures` are the PNG file names to embed)."""
    records = list(records)
    look = _Lookup(summary)
    benches = sorted(summary.loc[summary["metric"].map(lambda m: bool(_CORE.match(m))), "benchmark"].unique())
    rec_df = analysis.records_frame(records)
    model = run_info.get("model") or "unknown model"
    date = str(run_info.get("finished_at") or run_info.get("date") or dt.date.today().isoformat())[:10]

    out = [f"# Gap report: {model}", ""]
    meta = [f"Date: {date}"]
    if run_info.get("model_fingerprint"):
        meta.append(f"model fingerprint `{run_info['model_fingerprint']}`")
    if benches:
        meta.append("benchmarks: " + ", ".join(benches))
    if not rec_df.empty:
        meta.append("views: " + ", ".join(analysis.ordered_views(rec_df["view"].unique())))
    out += [" · ".join(meta), ""]
    out += [
        "**How to read.** `gap` = crop − full is what the model gains when it sees only the evidence. It splits",
        "into `box − full` = *where to look* (a red box shows where the evidence is) and `crop − box` = *how",
        "closely it looks* (the crop also enlarges it). Accuracies are in %, with 95% Wilson intervals; gaps are",
        "in percentage points on the paired samples (valid in every view), with 95% paired-bootstrap intervals.",
        "McNemar p is the exact test of full vs crop on the same samples.",
        "",
    ]
    if not benches:
        out += ["No results: the run produced no scored records.", ""]

    if benches:
        out += ["## Results", ""]
        out += _table(["benchmark", *MAIN_HEADER, "parse fail % (full/crop/box)", "errors"], (
            [bench, *_main_cells(look, bench, ALL),
             "/".join(_fmt_rate(look, bench, f"parse_fail_{v}") for v in CANONICAL_VIEWS),
             fmt_count(sum(look.value(bench, ALL, f"n_errors_{v}") for v in CANONICAL_VIEWS
                           if _finite(look.value(bench, ALL, f"n_errors_{v}"))))]
            for bench in benches))
        out.append("")
        out += _parse_fail_warning(look, benches)

    out += _category_section(summary, look, benches)
    out += _transition_section(look, benches)
    out += _area_section(look, benches)
    out += _selfzoom_section(look, benches, run_info)
    out += _focus_section(summary, look, benches)
    out += _other_section(summary)
    out += _notes(look, benches, rec_df, records)
    if figures:
        out += ["## Figures", ""]
        out += [f"![{FIGURES.get(name, name)}]({name})" for name in figures]
        out.append("")
    return "\n".join(out)


def _parse_fail_warning(look: _Lookup, benches: list[str]) -> list[str]:
    """A warning right under the results when a view's answers often could not be parsed: each such answer counts
    as wrong, so the view's accuracy and every gap that uses it measure the answer format as much as the seeing."""
    high = []
    for b in benches:
        rates = [(v, look.value(b, ALL, f"parse_fail_{v}")) for v in CANONICAL_VIEWS]
        shown = [f"{v} {r * 100:.0f}%" for v, r in rates if _finite(r) and r > PARSE_FAIL_WARN]
        if shown:
            high.append(f"{b} ({', '.join(shown)})")
    if not high:
        return []
    return [f"> **Warning: many answers could not be parsed** in {'; '.join(high)}. Each counts as wrong, so these "
            "accuracies and the gaps built on them partly measure the answer format. Check the responses in "
            "samples.jsonl; a longer `--max-new-tokens`, `--no-thinking` or an LLM judge (`--judge-base-url`) "
            "may help.", ""]


def _category_section(summary: pd.DataFrame, look: _Lookup, benches: list[str]) -> list[str]:
    out = []
    for bench in benches:
        cats = sorted(c for c in summary.loc[(summary["benchmark"] == bench) & (summary["metric"] == "n_samples"),
                                             "category"].unique() if c != ALL)
        if not cats:
            continue
        if not out:
            out += ["## By category", ""]
        out += [f"### {bench}", ""]
        out += _table(["category", *MAIN_HEADER], ([c, *_main_cells(look, bench, c)] for c in cats))
        out.append("")
    return out


def _transition_section(look: _Lookup, benches: list[str]) -> list[str]:
    have = [b for b in benches if look.get(b, ALL, "recoverable") is not None]
    if not have:
        return []
    out = ["## Transitions, full → crop", "",
           "*Recoverable* = wrong on the full image, right on the crop: the cases handed to the trainer.", ""]
    out += _table(["benchmark", "both right", "recoverable", "crop-only failure", "both wrong", "paired n"], (
        [b, *(fmt_count(look.value(b, ALL, m)) for m in TRANSITION_METRICS), look.n(b, ALL, "recoverable")]
        for b in have))
    out.append("")
    return out


def _area_section(look: _Lookup, benches: list[str]) -> list[str]:
    rows = []
    for b in benches:
        for label in AREA_LABELS:
            r = look.get(b, ALL, AREA_PREFIX + label)
            if r is not None:
                rows.append([b, label, fmt_count(r.n), fmt_gap(r.value, r.ci_low, r.ci_high)])
    if not rows:
        return []
    out = ["## Gap by evidence size", "",
           "Evidence area = union of the evidence boxes over the image area; gap = crop − full in pp.", ""]
    out += _table(["benchmark", "evidence area", "n", "gap"], rows)
    out.append("")
    return out


def _selfzoom_section(look: _Lookup, benches: list[str], run_info: dict) -> list[str]:
    have = [b for b in benches if look.get(b, ALL, "acc_selfcrop") is not None]
    if not have:
        return []
    sc = (run_info.get("attention") or {}).get("selfcrop") or {}
    if sc.get("method") == "paper":
        how = (f"the published method (*MLLMs Know Where to Look*): relative attention of layer {sc.get('layer')}, "
               f"windows of {sc.get('native_side')} px × 1–2, chosen by their contrast with the neighbouring windows; "
               "the model is asked with the full image and the crop")
    elif sc:
        how = ("vopd's grid method (not the paper's): relative attention of the middle layers, windows of ¼–½ of "
               "the token grid; the model is asked with the zoomed crop alone")
    else:
        how = "a window chosen by the model's own relative attention"
    out = ["## Self-zoom: the model crops by its own attention", "",
           f"`selfcrop` asks again after {how}. Recovery = (selfcrop − full) / (crop − full). Where evidence boxes "
           "exist: hit = the evidence centre lies in the window, coverage = the share of the evidence inside it, each "
           "beside the chance level of a window of the same size placed at random in the image (exact); IoU is "
           "capped far below 1 when the window is much larger than the evidence.", ""]

    def ratio(b: str, m: str) -> str:
        return _ratio_cell(look, b, m, with_n=False)

    def with_chance(b: str, m: str) -> str:
        return f"{_pct_cell(look, b, m, 1)} (random {_pct_cell(look, b, m + '_random', 1, ci=False)})"

    out += _table(["benchmark", "full %", "selfcrop %", "crop %", "selfcrop − full", "recovery", "hit %",
                   "coverage %", "IoU", "n"], (
        [b, look.acc(b, ALL, "acc_full"), look.acc(b, ALL, "acc_selfcrop"), look.acc(b, ALL, "acc_crop"),
         look.gap(b, ALL, "gap_selfzoom"), ratio(b, "selfzoom_recovery"), with_chance(b, "selfcrop_hit"),
         with_chance(b, "selfcrop_coverage"), ratio(b, "selfcrop_iou"), look.n(b, ALL, "gap_selfzoom")]
        for b in have))
    out.append("")
    return out


def _ratio_cell(look: _Lookup, bench: str, metric: str, with_n: bool = True) -> str:
    r = look.get(bench, ALL, metric)
    if r is None or not _finite(r.value):
        return DASH
    ci = f" [{r.ci_low:.2f}, {r.ci_high:.2f}]" if _finite(r.ci_low) and _finite(r.ci_high) else ""
    return f"{r.value:.2f}{ci}" + (f" (n={int(r.n)})" if with_n else "")


def _pct_cell(look: _Lookup, bench: str, metric: str, digits: int = 2, ci: bool = True, signed: bool = False) -> str:
    """A fraction as a percentage with `digits` decimals, and its interval."""
    r = look.get(bench, ALL, metric)
    if r is None or not _finite(r.value):
        return DASH
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    out = f.format(100 * r.value)
    if ci and _finite(r.ci_low) and _finite(r.ci_high):
        out += f" [{f.format(100 * r.ci_low)}, {f.format(100 * r.ci_high)}]"
    return out


def _focus_section(summary: pd.DataFrame, look: _Lookup, benches: list[str]) -> list[str]:
    rows = []
    for b in benches:
        names = summary.loc[(summary["benchmark"] == b) & (summary["category"] == ALL), "metric"]
        for view in analysis.ordered_views(m.removeprefix("focus_").removesuffix("_share") for m in names
                                           if re.fullmatch(r"focus_[a-z]+_share", m)):
            m = f"focus_{view}"
            errors = look.value(b, ALL, f"{m}_errors")
            rows.append([b, view, fmt_count(look.value(b, ALL, f"{m}_layer")),
                         _pct_cell(look, b, f"{m}_share"), _pct_cell(look, b, f"{m}_share_median"),
                         _pct_cell(look, b, f"{m}_area", ci=False) + " / " + _pct_cell(look, b, f"{m}_area_median", ci=False),
                         _pct_cell(look, b, f"{m}_lift", signed=True), _pct_cell(look, b, f"{m}_share_correct"),
                         _pct_cell(look, b, f"{m}_share_wrong"),
                         _pct_cell(look, b, f"{m}_correct_minus_wrong", signed=True),
                         look.n(b, ALL, f"{m}_share") + (f" ({int(errors)} unusable)" if _finite(errors) and errors else "")])
    if not rows:
        return []
    out = ["## Focus: attention on the evidence", "",
           "Share = the part of the answer position's attention to the image that falls on the evidence (head mean, "
           "one layer), in %; area = the evidence's share of the image tokens, which a uniform spread would give it "
           "(mean / median); lift = share − area, paired. Right − wrong compares the mean share of right and wrong "
           "answers within evidence-size bins (weighted by bin size), since larger evidence both draws attention and "
           "is answered better. Only answers whose image shows the evidence count (a self-zoom window that misses "
           "it has none). 95% bootstrap intervals.", ""]
    out += _table(["benchmark", "view", "layer", "share (mean)", "share (median)", "area (mean / median)", "lift",
                   "right answers", "wrong answers", "right − wrong (by size)", "n"], rows)
    out.append("")
    return out


def _other_section(summary: pd.DataFrame) -> list[str]:
    """Rows the tables above do not show: benchmark-specific metrics and cross-benchmark aggregates."""
    extra = summary[~summary["metric"].map(lambda m: bool(_CORE.match(m)))]
    if extra.empty:
        return []
    out = ["## Other metrics", ""]
    out += _table(["benchmark", "category", "metric", "value", "95% CI", "n"], (
        [r.benchmark, r.category, r.metric, f"{r.value:.4g}" if _finite(r.value) else DASH,
         f"[{r.ci_low:.4g}, {r.ci_high:.4g}]" if _finite(r.ci_low) and _finite(r.ci_high) else DASH,
         fmt_count(r.n)] for r in extra.itertuples(index=False)))
    out.append("")
    return out


def _notes(look: _Lookup, benches: list[str], rec_df: pd.DataFrame, records: Sequence[Any]) -> list[str]:
    notes = []
    for b in benches:
        n = look.value(b, ALL, "n_samples")
        no_ev = look.value(b, ALL, "n_no_evidence")
        if _finite(no_ev) and no_ev > 0:
            notes.append(f"{b}: {int(no_ev)} of {int(n)} samples have no evidence box; they were asked the full view "
                         "only and count in the full accuracy but not in the gaps.")
        clamped = look.value(b, ALL, "boxes_clamped")
        if _finite(clamped) and clamped > 0:
            notes.append(f"{b}: {int(clamped)} evidence box(es) reached outside their image and were clamped to it.")
        errs = look.value(b, ALL, "n_sample_errors")
        if _finite(errs) and errs > 0:
            notes.append(f"{b}: {int(errs)} sample(s) have at least one errored record; errored records are left "
                         "out of every accuracy and gap (see samples.jsonl for the reasons).")
    if not rec_df.empty:
        reasons = Counter(rec_df.loc[~rec_df["valid"], "error"].map(lambda e: str(e).splitlines()[0][:120]))
        for reason, count in reasons.most_common(3):
            notes.append(f"{count} record(s) failed with: {reason}")
        n_fail = len(analysis.failures(records))
        notes.append(f"{n_fail} recoverable case(s) (full wrong, crop right) are in failures.jsonl for `vopd distill`.")
    if not notes:
        return []
    return ["## Notes", "", *(f"- {n}" for n in notes), ""]


def write_report(out_dir: str | Path, summary: pd.DataFrame, records: Sequence[Any], run_info: dict) -> Path:
    """Write report.md and its PNG figures into `out_dir`; returns the path of report.md."""
    return write_report_with_figures(out_dir, summary, records, run_info)[0]


def write_report_with_figures(out_dir: str | Path, summary: pd.DataFrame, records: Sequence[Any],
                              run_info: dict) -> tuple[Path, dict[str, Path]]:
    """As `write_report`, also returning the figures (name -> PNG path) for reuse by the HTML report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = plots.plot_all(summary, out_dir)
    path = out_dir / "report.md"
    path.write_text(render_report(summary, records, run_info, figures=list(written)), encoding="utf-8")
    return path, written
