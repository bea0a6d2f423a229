"""Benchmark-specific metrics: each benchmark's own convention, and the paper's where the two differ.

Each `*_metrics` function takes the records DataFrame of one benchmark (one row per record, columns = Record
fields) and returns summary rows (benchmark is filled in by the caller; category defaults to `all`). The plain
accuracy per view and per category (`acc_<view>`) comes from the analysis module and is not repeated here.
A record counts when it has no error; a parse failure is wrong. Metric names end in the view they measure:

- HR-Bench: `acc_cycle_<view>` per cycle (category `cycle:<value>`) and `acc_cycle_mean_<view>`, the official
  mean over cycles, overall and per category (single, cross). The paper's pooled accuracy is `acc_<view>`.
- MME-RealWorld: `acc_task_<view>` per task (Perception, Reasoning) and `acc_l2_<view>` per subtask
  (category `<category>/<l2-category>`, attribute subtasks merged as lmms-eval does).
- VisualProbe: `acc_level_mean_<view>`, the mean of the difficulty-level accuracies.
- MMVP: `acc_pair_<view>`, pairs (Index 1-2, 3-4, …) with both questions right; n = complete pairs.
- CV-Bench: `acc_official_<view>` = ½·((ADE20K + COCO)/2 + Omni3D), `acc_2d3d_<view>` = (2D + 3D)/2 (the
  paper's), and the parts `acc_source_<view>`, `acc_type_<view>`.
- MMStar: `acc_l2_mean_<view>`, the mean over l2 categories, overall and per core category.
- POPE: `precision_<view>`, `recall_<view>`, `f1_<view>`, overall and per category, and two yes-ratios under
  distinct names: `yes_ratio_pred_<view>`, the share of "yes" predictions (the original POPE's "yes ratio"), and
  `yes_ratio_gt_<view>`, the share of "yes" ground truths (what lmms-eval and the Vision-OPD script report under
  that name). With `pope`, an unparsed answer counts as not "yes" (and wrong); `pope@original` reads every
  answer as the original POPE script does, so nothing is unparsed (see `hub/pope.py`).

Intervals: Wilson for proportions; a seeded parametric bootstrap for means of group accuracies and for F1.
`headline_average` adds the paper's Table 1 average to a finished summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from vopd_bench import stats

ALL = "all"
N_BOOT = 2000
SEED = 0

# Paper Table 1: the v2 set (MME-RealWorld English) and the v1 set (Lite in its place).
HEADLINE = ("vstar", "zoombench", "hrbench-4k", "hrbench-8k", "mme-realworld", "mme-realworld-cn")
HEADLINE_V1 = ("vstar", "zoombench", "hrbench-4k", "hrbench-8k", "mme-realworld-lite", "mme-realworld-cn")


# ---------------------------------------------------------------------------------------------------------------
# Building blocks


def _row(metric: str, est: stats.Estimate, category: str = ALL) -> dict:
    return {"category": str(category), "metric": metric, "value": est.value, "ci_low": est.ci_low,
            "ci_high": est.ci_high, "n": est.n}


def scored(df: pd.DataFrame) -> pd.DataFrame:
    """The error-free records with `right` (correct and parsed) as 0/1."""
    if df.empty:
        return df.assign(right=pd.Series(dtype=int))
    ok = df[df["error"].isna()].copy()
    ok["right"] = (ok["correct"].fillna(False).astype(bool) & ~ok["parse_failed"].fillna(False).astype(bool)).astype(int)
    return ok


def meta(df: pd.DataFrame, key: str) -> pd.Series:
    """One field of each record's `meta`, as text ("unknown" where it is missing)."""
    return df["meta"].map(lambda m: m.get(key) if isinstance(m, Mapping) else None).map(
        lambda v: "unknown" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))


def by_view(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    ok = scored(df)
    return [(v, ok[ok["view"] == v]) for v in sorted(ok["view"].unique())] if not ok.empty else []


def groups(df: pd.DataFrame, keys: pd.Series) -> dict[str, np.ndarray]:
    return {str(k): g["right"].to_numpy() for k, g in df.groupby(keys, sort=True)}


def weighted_accuracy(outcomes: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None,
                      n_boot: int = N_BOOT, seed: int = SEED) -> stats.Estimate:
    """Σ w_k·acc_k / Σ w_k over groups (equal weights by default). The interval resamples each group on its
    own (a binomial draw per group), percentile 95%."""
    names = [k for k in outcomes if len(outcomes[k])]
    if not names:
        return stats.Estimate(stats.NAN, stats.NAN, stats.NAN, 0)
    w = np.array([1.0 if weights is None else weights[k] for k in names])
    n = np.array([len(outcomes[k]) for k in names])
    p = np.array([float(np.mean(outcomes[k])) for k in names])
    value = float(w @ p / w.sum())
    rng = np.random.default_rng(seed)
    reps = rng.binomial(n[None, :], p[None, :], size=(n_boot, len(names))) / n[None, :]
    lo, hi = stats.percentile_ci(reps @ w / w.sum())
    return stats.Estimate(value, lo, hi, int(n.sum()))


def _per_group(metric: str, df: pd.DataFrame, keys: pd.Series, label: Callable[[str], str] = str) -> list[dict]:
    return [_row(metric, stats.proportion(o), label(k)) for k, o in groups(df, keys).items()]


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks


def hrbench_metrics(df: pd.DataFrame) -> list[dict]:
    rows: list[dict] = []
    for view, v in by_view(df):
        cycle, category = meta(v, "cycle_category"), meta(v, "category")
        rows += _per_group(f"acc_cycle_{view}", v, cycle, lambda c: f"cycle:{c}")
        rows.append(_row(f"acc_cycle_mean_{view}", weighted_accuracy(groups(v, cycle))))
        for cat, part in v.groupby(category, sort=True):
            rows.append(_row(f"acc_cycle_mean_{view}", weighted_accuracy(groups(part, cycle[part.index])), cat))
    return rows


def mme_task(category: str) -> str:
    return "Perception" if "perception" in category.lower() else "Reasoning"


def mme_subtask(category: str, l2: str) -> str:
    l2 = l2.lower()
    if "attribute" in l2:
        l2 = l2.split("/")[0] + "/attribute"
    return f"{category}/{l2}"


def mme_realworld_metrics(df: pd.DataFrame) -> list[dict]:
    rows: list[dict] = []
    for view, v in by_view(df):
        category, l2 = meta(v, "category"), meta(v, "l2-category")
        rows += _per_group(f"acc_task_{view}", v, category.map(mme_task))
        rows += _per_group(f"acc_l2_{view}", v, pd.Series(map(mme_subtask, category, l2), index=v.index))
    return rows


def visualprobe_metrics(df: pd.DataFrame) -> list[dict]:
    return [_row(f"acc_level_mean_{view}", weighted_accuracy(groups(v, meta(v, "level")))) for view, v in by_view(df)]


def mmvp_metrics(df: pd.DataFrame) -> list[dict]:
    rows: list[dict] = []
    for view, v in by_view(df):
        pair = meta(v, "Index").map(lambda i: (int(i) - 1) // 2 if i.isdigit() else None)
        both = [int(g["right"].all()) for _, g in v.groupby(pair, sort=True) if len(g) == 2]
        rows.append(_row(f"acc_pair_{view}", stats.proportion(np.array(both, dtype=int))))
    return rows


OFFICIAL_CV = {"ade20k": 0.25, "coco": 0.25, "omni3d": 0.5}


def cvbench_metrics(df: pd.DataFrame) -> list[dict]:
    rows: list[dict] = []
    for view, v in by_view(df):
        source, kind = meta(v, "source"), meta(v, "type")
        rows += _per_group(f"acc_source_{view}", v, source)
        rows += _per_group(f"acc_type_{view}", v, kind)
        by_source = {k.lower(): o for k, o in groups(v, source).items()}
        if set(OFFICIAL_CV) <= set(by_source):
            rows.append(_row(f"acc_official_{view}", weighted_accuracy(by_source, OFFICIAL_CV)))
        by_type = {k.lower(): o for k, o in groups(v, kind).items()}
        if {"2d", "3d"} <= set(by_type):
            rows.append(_row(f"acc_2d3d_{view}", weighted_accuracy({k: by_type[k] for k in ("2d", "3d")})))
    return rows


def mmstar_metrics(df: pd.DataFrame) -> list[dict]:
    rows: list[dict] = []
    for view, v in by_view(df):
        l2, core = meta(v, "l2_category"), meta(v, "category")
        rows.append(_row(f"acc_l2_mean_{view}", weighted_accuracy(groups(v, l2))))
        for cat, part in v.groupby(core, sort=True):
            rows.append(_row(f"acc_l2_mean_{view}", weighted_accuracy(groups(part, l2[part.index])), cat))
    return rows


def pope_counts(gt_yes: np.ndarray, pred_yes: np.ndarray) -> np.ndarray:
    """[TP, FP, FN, TN] with "yes" as the positive class."""
    return np.array([np.sum(gt_yes & pred_yes), np.sum(~gt_yes & pred_yes), np.sum(gt_yes & ~pred_yes),
                     np.sum(~gt_yes & ~pred_yes)])


def _f1(cells: np.ndarray) -> np.ndarray:
    tp, fp, fn = cells[..., 0], cells[..., 1], cells[..., 2]
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def pope_scores(gt_yes: np.ndarray, pred_yes: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED) -> dict[str, stats.Estimate]:
    """Precision, recall, F1, and the yes-ratios of the predictions and of the ground truth."""
    cells = pope_counts(gt_yes, pred_yes)
    tp, fp, fn, _tn = (int(c) for c in cells)
    n = int(cells.sum())

    def prop(k: int, m: int) -> stats.Estimate:
        return stats.Estimate(k / m, *stats.wilson_ci(k, m), m) if m else stats.Estimate(stats.NAN, stats.NAN, stats.NAN, 0)

    f1 = float(_f1(cells))
    if n and math.isfinite(f1):
        reps = _f1(np.random.default_rng(seed).multinomial(n, cells / n, size=n_boot))
        lo, hi = stats.percentile_ci(reps[np.isfinite(reps)])
    else:
        lo = hi = stats.NAN
    return {"precision": prop(tp, tp + fp), "recall": prop(tp, tp + fn), "f1": stats.Estimate(f1, lo, hi, n),
            "yes_ratio_pred": prop(tp + fp, n), "yes_ratio_gt": prop(tp + fn, n)}


def pope_metrics(df: pd.DataFrame) -> list[dict]:
    rows: list[dict] = []
    for view, v in by_view(df):
        category = meta(v, "category")
        for cat, part in [(ALL, v)] + list(v.groupby(category, sort=True)):
            gt = part["answer"].map(lambda a: str(a).strip().lower() == "yes").to_numpy(bool)
            pred = part["parsed"].map(lambda a: a is not None and str(a).strip().lower() == "yes").to_numpy(bool)
            for name, est in pope_scores(gt, pred).items():
                rows.append(_row(f"{name}_{view}", est, cat))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The paper's headline average


def _member_row(summary: pd.DataFrame, name: str) -> pd.Series | None:
    """The whole-benchmark full-view accuracy of `name`, or of its one prompt variant (`name@…`) if only that
    ran."""
    rows = summary[(summary["category"] == ALL) & (summary["metric"] == "acc_full")]
    exact = rows[rows["benchmark"] == name]
    pick = exact if len(exact) else rows[rows["benchmark"].astype(str).str.startswith(name + "@")]
    if len(pick) != 1 or not math.isfinite(float(pick["value"].iloc[0])):
        return None
    return pick.iloc[0]


def headline_average(summary: pd.DataFrame) -> list[dict[str, Any]]:
    """The paper's Table 1 average (unweighted mean of the six fine-grained full-view accuracies) as summary
    rows: benchmark `average` (V*, ZoomBench, HR-4K, HR-8K, MME-RW EN, MME-RW CN; paper v2) and `average-v1`
    (MME-RW Lite in place of EN; paper v1), each only when all six members are in the summary. n = the members'
    summed n; no interval."""
    if summary is None or summary.empty:
        return []
    out = []
    for name, members in (("average", HEADLINE), ("average-v1", HEADLINE_V1)):
        picked = [_member_row(summary, m) for m in members]
        if all(p is not None for p in picked):
            out.append({"benchmark": name, "category": ALL, "metric": "acc_full",
                        "value": float(np.mean([float(p["value"]) for p in picked])), "ci_low": stats.NAN,
                        "ci_high": stats.NAN, "n": int(sum(int(p["n"]) for p in picked))})
    return out
