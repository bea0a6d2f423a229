"""From scored records to the tidy summary (summary.csv) and the trainer's failure hand-off (failures.jsonl).

The summary has one row per (benchmark, category, metric) with columns `benchmark, category, metric, value,
ci_low, ci_high, n`; category `all` is the whole benchmark. Accuracies, gaps and rates are fractions in [0, 1];
counts are plain numbers with no interval (ci_low/ci_high are NaN where an interval does not apply).

Metrics, per benchmark and per category (`<view>` is each view that was run: full, crop, box):
- `n_samples`: distinct samples that have any record.
- `acc_<view>`: accuracy over the view's valid (error-free) records; a parse failure counts as wrong. Wilson CI.
- `acc_<view>_paired`: the same, over the paired samples the gaps use (below).
- `gap` = crop − full, `gap_locate` = box − full, `gap_zoom` = crop − box: differences of accuracy on the
  *paired* samples, i.e. those with a valid record for every view that was run (and answered at least once
  in the benchmark), so that gap equals gap_locate + gap_zoom. Percentile CI of a paired bootstrap over
  samples. n = paired samples.
- `mcnemar_p`: exact McNemar test of full vs crop on the paired samples.
- `both_right`, `recoverable` (full wrong, crop right), `crop_only_failure` (full right, crop wrong),
  `both_wrong`: counts on the paired samples (value = count, n = paired samples).
- `gap_area:<lo>-<hi>%`: the gap on the paired samples whose evidence covers that share of the image;
  empty bins are left out.
- `parse_fail_<view>`: share of the view's valid records whose response could not be parsed. Wilson CI.
- `n_errors_<view>`: records of the view that carry an error (n = records of the view).
- `n_sample_errors`: samples with at least one errored record (n = n_samples).
- `n_no_evidence`: samples that have no box and therefore got the full view only (n = n_samples).
- `boxes_clamped`: boxes clamped to their image, summed over samples (n = n_samples).
- With `--focus` or the selfcrop view: `focus_<view>_*` (attention share on the evidence beside its area),
  `gap_selfzoom`, `selfzoom_recovery`, `selfcrop_*` (window hit and coverage beside random windows, IoU); see
  `vopd_bench.focus`. The selfcrop view needs no evidence and stays out of the gaps above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from vopd_bench import stats
from vopd_bench.errors import VopdError
from vopd_bench.records import Record

SUMMARY_COLUMNS = ["benchmark", "category", "metric", "value", "ci_low", "ci_high", "n"]
ALL = "all"
CANONICAL_VIEWS = ("full", "crop", "box")
GAP_METRICS = {"gap": ("crop", "full"), "gap_locate": ("box", "full"), "gap_zoom": ("crop", "box")}
TRANSITION_METRICS = ("both_right", "recoverable", "crop_only_failure", "both_wrong")

# Relative evidence area (union box / image). Targets of high-resolution benchmarks cover roughly
# 0.1 %–10 % of the image, so the bins are finest there; the outer bins catch the rest.
AREA_EDGES = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.10, 1.0)
AREA_PREFIX = "gap_area:"

ExtraMetrics = Callable[[pd.DataFrame], list[dict]]
RecordLike = Record | Mapping[str, Any]


def _pct(x: float) -> str:
    return f"{x * 100:g}"


AREA_LABELS = tuple(f"{_pct(lo)}-{_pct(hi)}%" for lo, hi in zip(AREA_EDGES[:-1], AREA_EDGES[1:], strict=True))


def area_bin(area: float | None) -> str | None:
    """The label of the evidence-size bin of a relative area, e.g. 0.003 -> '0.1-0.5%'; None when unknown."""
    if area is None or not math.isfinite(area):
        return None
    i = int(np.searchsorted(AREA_EDGES, area, side="right")) - 1
    return AREA_LABELS[min(max(i, 0), len(AREA_LABELS) - 1)]


def records_frame(records: Iterable[RecordLike]) -> pd.DataFrame:
    """All records as a DataFrame (one column per Record field), the last record of each
    (benchmark, sample_id, view) kept.

    The store is append-only: a retried backend error or a `--force` rerun appends a newer record for the
    same request, and the newer one is the answer of record.
    """
    columns = list(Record.__dataclass_fields__)
    rows = []
    for i, r in enumerate(records):
        if not isinstance(r, Record):
            try:
                r = Record.from_dict(dict(r))
            except TypeError:
                missing = [f for f in ("key", "benchmark", "sample_id", "view") if f not in r]
                raise VopdError(f"record {i} is missing field(s) {', '.join(missing) or '?'}") from None
        # A shallow row: dataclasses.asdict deep-copies every list and dominates the cost on large runs.
        rows.append([getattr(r, c) for c in columns])
    df = pd.DataFrame(rows, columns=columns)
    if df.empty:
        return df
    df["sample_id"] = df["sample_id"].astype(str)
    df = df.drop_duplicates(["benchmark", "sample_id", "view"], keep="last").reset_index(drop=True)
    df["valid"] = df["error"].isna()
    # A parse failure is wrong whatever the scorer said; an errored record has no outcome.
    df["right"] = df["valid"] & df["correct"].fillna(False).astype(bool) & ~df["parse_failed"].astype(bool)
    return df


def ordered_views(views: Iterable[str]) -> list[str]:
    present = set(views)
    return [v for v in CANONICAL_VIEWS if v in present] + sorted(present - set(CANONICAL_VIEWS))


def sample_table(bdf: pd.DataFrame, views: list[str]) -> pd.DataFrame:
    """One row per sample of one benchmark: its category, evidence facts and, per view, whether a record
    exists (`has_<v>`), whether it is valid (`ok_<v>`), right (`right_<v>`) and a parse failure (`pf_<v>`)."""
    # The full view's record speaks for the sample where views disagree on a per-sample field.
    bdf = bdf.assign(
        _order=(bdf["view"] != "full").astype(int),
        _has_boxes=bdf["boxes"].map(bool),
        _sample_error=bdf["error_kind"] == "sample",
        evidence_area=pd.to_numeric(bdf["evidence_area"], errors="coerce"),
    ).sort_values(["_order"], kind="stable")
    g = bdf.groupby("sample_id", sort=True)
    out = pd.DataFrame({
        "category": g["category"].first(),  # first non-null, the full view's when it has one
        "evidence_area": g["evidence_area"].first(),
        "boxes_clamped": g["boxes_clamped"].max().fillna(0).astype(int),
        "has_boxes": g["_has_boxes"].any(),
        "any_error": ~g["valid"].all(),
        "sample_error": g["_sample_error"].any(),
    })
    for v in views:
        vdf = bdf[bdf["view"] == v].set_index("sample_id")
        out[f"has_{v}"] = out.index.isin(vdf.index)
        ok = vdf["valid"].reindex(out.index)
        out[f"ok_{v}"] = ok.fillna(False).astype(bool)
        out[f"right_{v}"] = vdf["right"].reindex(out.index).fillna(False).astype(int)
        out[f"pf_{v}"] = (vdf["parse_failed"].astype(bool) & vdf["valid"]).reindex(out.index).fillna(False).astype(int)
    return out


def _row(bench: str, cat: str, metric: str, value: float, lo: float = stats.NAN, hi: float = stats.NAN,
         n: int = 0) -> dict:
    return {"benchmark": bench, "category": cat, "metric": metric, "value": float(value), "ci_low": float(lo),
            "ci_high": float(hi), "n": int(n)}


def _est_row(bench: str, cat: str, metric: str, est: stats.Estimate) -> dict:
    return _row(bench, cat, metric, est.value, est.ci_low, est.ci_high, est.n)


def _group_metrics(bench: str, cat: str, st: pd.DataFrame, views: list[str], paired_views: list[str],
                   n_boot: int, seed: int) -> list[dict]:
    rows = [_row(bench, cat, "n_samples", len(st), n=len(st))]
    for v in views:
        ok = st[f"ok_{v}"]
        rows.append(_est_row(bench, cat, f"acc_{v}", stats.proportion(st.loc[ok, f"right_{v}"].to_numpy())))

    if "full" in paired_views and len(paired_views) > 1:
        paired = st[st[[f"ok_{v}" for v in paired_views]].all(axis=1)]
        rows += _paired_metrics(bench, cat, paired, paired_views, n_boot, seed)

    for v in views:
        ok = st[f"ok_{v}"]
        rows.append(_est_row(bench, cat, f"parse_fail_{v}", stats.proportion(st.loc[ok, f"pf_{v}"].to_numpy())))
    for v in views:
        has = st[f"has_{v}"]
        rows.append(_row(bench, cat, f"n_errors_{v}", int((has & ~st[f"ok_{v}"]).sum()), n=int(has.sum())))
    rows.append(_row(bench, cat, "n_sample_errors", int(st["any_error"].sum()), n=len(st)))
    others = [v for v in views if v not in ("full", "selfcrop")]  # selfcrop needs no evidence
    full_only = ~st[[f"has_{v}" for v in others]].any(axis=1) if others else pd.Series(True, index=st.index)
    no_evidence = full_only & ~st["has_boxes"] & ~st["sample_error"]
    rows.append(_row(bench, cat, "n_no_evidence", int(no_evidence.sum()), n=len(st)))
    rows.append(_row(bench, cat, "boxes_clamped", int(st["boxes_clamped"].sum()), n=len(st)))
    return rows


def _paired_metrics(bench: str, cat: str, paired: pd.DataFrame, views: list[str], n_boot: int,
                    seed: int) -> list[dict]:
    """Accuracies, gaps, McNemar and transitions on samples valid in every view (`views` includes full)."""
    n = len(paired)
    rows = []
    for v in views:
        rows.append(_est_row(bench, cat, f"acc_{v}_paired", stats.proportion(paired[f"right_{v}"].to_numpy())))
    gaps = {name: pair for name, pair in GAP_METRICS.items() if set(pair) <= set(views)}
    if n == 0:
        rows += [_row(bench, cat, name, stats.NAN) for name in gaps]
        return rows

    outcomes = paired[[f"right_{v}" for v in views]].to_numpy()
    reps = stats.bootstrap_means(outcomes, n_boot=n_boot, seed=seed)  # one resample for all gaps
    col = {v: i for i, v in enumerate(views)}
    sums = outcomes.sum(axis=0)
    values = {name: (int(sums[col[a]]) - int(sums[col[b]])) / n for name, (a, b) in gaps.items()}
    if "gap_locate" in values:
        # Same samples, so crop − full = (box − full) + (crop − box); summing keeps that identity bit-exact.
        values["gap"] = values["gap_locate"] + values["gap_zoom"]
    for name, (a, b) in gaps.items():
        lo, hi = stats.percentile_ci(reps[:, col[a]] - reps[:, col[b]])
        rows.append(_row(bench, cat, name, values[name], lo, hi, n))

    if "crop" in views:
        t = stats.transitions(paired["right_full"].to_numpy(), paired["right_crop"].to_numpy())
        rows.append(_row(bench, cat, "mcnemar_p", stats.mcnemar_exact(t.recoverable, t.second_only_failure), n=n))
        counts = (t.both_right, t.recoverable, t.second_only_failure, t.both_wrong)
        rows += [_row(bench, cat, m, c, n=n) for m, c in zip(TRANSITION_METRICS, counts, strict=True)]
        bins = paired["evidence_area"].map(area_bin)
        for label in AREA_LABELS:
            sub = paired[bins == label]
            if len(sub):
                est = stats.paired_diff(sub["right_crop"].to_numpy(), sub["right_full"].to_numpy(),
                                        n_boot=n_boot, seed=seed)
                rows.append(_est_row(bench, cat, AREA_PREFIX + label, est))
    return rows


def _attention_metrics(bench: str, cat: str, st: pd.DataFrame, bdf: pd.DataFrame, views: list[str],
                       n_boot: int, seed: int) -> list[dict]:
    """--focus and selfcrop rows (vopd_bench.focus); none for runs without them."""
    from vopd_bench import focus

    return (focus.focus_rows(bench, cat, bdf, views, n_boot, seed, area_bin, AREA_LABELS)
            + focus.selfzoom_rows(bench, cat, st, bdf, n_boot, seed))


def _extra_rows(bench: str, fn: ExtraMetrics, bdf: pd.DataFrame) -> list[dict]:
    out = []
    for row in fn(bdf.drop(columns=["valid", "right"])):
        missing = [k for k in ("metric", "value", "n") if k not in row]
        unknown = set(row) - set(SUMMARY_COLUMNS)
        if missing or unknown:
            raise VopdError(f"extra metric row for {bench} has missing {missing} or unknown {sorted(unknown)} fields")
        out.append(_row(row.get("benchmark", bench), row.get("category", ALL), row["metric"], row["value"],
                        row.get("ci_low", stats.NAN), row.get("ci_high", stats.NAN), row["n"]))
    return out


def summarize(records: Iterable[RecordLike], *, extra_metrics: Mapping[str, ExtraMetrics] | None = None,
              n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The tidy summary of scored records (see the module docstring for the metrics).

    `extra_metrics` maps a benchmark name to a function of that benchmark's records DataFrame (one row per
    record, columns = Record fields) returning rows in the summary schema (`metric`, `value`, `n` required;
    `category` defaults to `all`); they are appended after the benchmark's own rows.
    Deterministic for a seed: benchmarks and categories are sorted, metrics come in a fixed order.
    """
    df = records_frame(records)
    rows: list[dict] = []
    if not df.empty:
        for bench in sorted(df["benchmark"].unique()):
            bdf = df[df["benchmark"] == bench]
            views = ordered_views(bdf["view"].unique())
            st = sample_table(bdf, views)
            # A view whose every record failed (e.g. the box view of a benchmark that ships crops but no boxes)
            # would leave no paired sample at all; the gaps are then taken over the views that did answer.
            paired_views = [v for v in CANONICAL_VIEWS if v in views and st[f"ok_{v}"].any()]
            rows += _group_metrics(bench, ALL, st, views, paired_views, n_boot, seed)
            rows += _attention_metrics(bench, ALL, st, bdf, views, n_boot, seed)
            for cat in sorted(c for c in st["category"].dropna().unique()):
                sub = st[st["category"] == cat]
                rows += _group_metrics(bench, str(cat), sub, views, paired_views, n_boot, seed)
                rows += _attention_metrics(bench, str(cat), sub, bdf[bdf["sample_id"].isin(sub.index)], views,
                                           n_boot, seed)
            if extra_metrics and bench in extra_metrics:
                rows += _extra_rows(bench, extra_metrics[bench], bdf)
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return out.astype({"value": float, "ci_low": float, "ci_high": float, "n": int})


def failures(records: Iterable[RecordLike]) -> list[dict]:
    """The recoverable cases: full view wrong, crop view right, both records valid. One dict per sample with
    all the trainer needs; sorted by (benchmark, sample_id).

    `answer` is kept for people reading the file; the trainer never reads it (it learns from the model's own
    crop-view distribution, not from the label).
    """
    return _crop_right(records, full_right=False)


def both_right(records: Iterable[RecordLike]) -> list[dict]:
    """The cases the model already reads on both views (full right, crop right), in the same form as
    `failures`: `vopd distill --replay` mixes a share of them into training on failures, so that the adapter
    also sees prompts whose answer must not move."""
    return _crop_right(records, full_right=True)


def _crop_right(records: Iterable[RecordLike], *, full_right: bool) -> list[dict]:
    df = records_frame(records)
    if df.empty:
        return []
    keys = ["benchmark", "sample_id"]
    full = df[(df["view"] == "full") & df["valid"] & (df["right"] == full_right)]
    crop = df[(df["view"] == "crop") & df["valid"] & df["right"]][[*keys, "response", "parsed", "boxes"]]
    both = full.merge(crop, on=keys, suffixes=("", "_crop")).sort_values(keys)
    return [{
        "benchmark": f["benchmark"],
        "sample_id": f["sample_id"],
        "image": f["image"],
        "image_size": f["image_size"],
        "boxes": f["boxes"] or f["boxes_crop"],
        "evidence_area": _none_if_nan(f["evidence_area"]),
        "question": f["question"],
        "options": list(f["options"] or []),
        "answer_type": f["answer_type"],
        "category": f["category"],
        "prompt": f["prompt"],
        "full_response": f["response"],
        "full_parsed": f["parsed"],
        "crop_response": f["response_crop"],
        "crop_parsed": f["parsed_crop"],
        "answer": f["answer"],
        "meta": f["meta"] or {},
    } for f in both.to_dict("records")]


def _none_if_nan(x: Any) -> Any:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
