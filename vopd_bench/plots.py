"""The report's figures, drawn from the tidy summary (category `all` rows).

Each function takes the summary DataFrame and an output path and returns the path it wrote, or None when the
summary lacks the metrics the figure needs (the report then simply has no such figure). Figures are built
with `matplotlib.figure.Figure` and rendered by the Agg canvas, so nothing touches pyplot's global state or a
display.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vopd_bench.analysis import ALL, AREA_LABELS, AREA_PREFIX

# One colour per quantity, shared by every figure so a reader learns it once.
COLORS = {
    "full": "#4C72B0",
    "crop": "#55A868",
    "box": "#C44E52",
    "selfcrop": "#DD8452",
    "gap": "#55A868",
    "gap_locate": "#C44E52",
    "gap_zoom": "#8172B2",
}
LABELS = {
    "full": "full image",
    "crop": "evidence crop",
    "box": "full + red box",
    "selfcrop": "self-zoom (attention window)",
    "gap": "gap (crop − full)",
    "gap_locate": "where to look (box − full)",
    "gap_zoom": "how closely (crop − box)",
}
BENCH_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B2", "#937860", "#DA8BC3", "#8C8C8C")
DPI = 130


def _overall(summary: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    rows = summary[(summary["category"] == ALL) & summary["metric"].isin(metrics)]
    return rows[rows["value"].map(lambda v: isinstance(v, (int, float)) and math.isfinite(v))]


def _yerr(rows: pd.DataFrame, scale: float) -> np.ndarray:
    """Asymmetric error bars from the CI columns; no bar where there is no interval."""
    lo = (rows["value"] - rows["ci_low"]).fillna(0).clip(lower=0) * scale
    hi = (rows["ci_high"] - rows["value"]).fillna(0).clip(lower=0) * scale
    return np.vstack([lo.to_numpy(), hi.to_numpy()])


def _new_figure(n_groups: int, height: float = 3.8) -> tuple[Figure, object]:
    fig = Figure(figsize=(max(5.0, 1.4 + 1.6 * n_groups), height), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _grouped_bars(summary: pd.DataFrame, keys: list[str], metric_of: dict[str, str], path: Path, title: str,
                  ylabel: str, percent_axis: bool) -> Path | None:
    rows = _overall(summary, [metric_of[k] for k in keys])
    if rows.empty:
        return None
    benches = sorted(rows["benchmark"].unique())
    present = [k for k in keys if (rows["metric"] == metric_of[k]).any()]
    fig, ax = _new_figure(len(benches))
    width = 0.8 / len(present)
    x = np.arange(len(benches))
    for i, k in enumerate(present):
        sub = rows[rows["metric"] == metric_of[k]].set_index("benchmark").reindex(benches)
        have = sub["value"].notna().to_numpy()
        xs = x[have] + (i - (len(present) - 1) / 2) * width
        vals = sub["value"].to_numpy()[have] * 100
        bars = ax.bar(xs, vals, width * 0.92, yerr=_yerr(sub[have], 100), capsize=3, color=COLORS[k],
                      label=LABELS[k], error_kw={"elinewidth": 1, "alpha": 0.8})
        ax.bar_label(bars, labels=[f"{v:+.1f}" if not percent_axis else f"{v:.1f}" for v in vals],
                     fontsize=7, padding=2)
    ax.set_xticks(x, benches)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if percent_axis:
        ax.set_ylim(0, 105)
    else:
        ax.axhline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=8, frameon=False, loc="best")
    path = Path(path)
    fig.savefig(path)
    return path


def plot_accuracy(summary: pd.DataFrame, path: str | Path) -> Path | None:
    """Accuracy per view and benchmark, with 95% Wilson intervals."""
    views = ["full", "crop", "box", "selfcrop"]
    return _grouped_bars(summary, views, {v: f"acc_{v}" for v in views}, path,
                         "Accuracy per view (95% CI)", "accuracy (%)", percent_axis=True)


def plot_gap(summary: pd.DataFrame, path: str | Path) -> Path | None:
    """The gap and its two parts per benchmark, with 95% paired-bootstrap intervals."""
    keys = ["gap", "gap_locate", "gap_zoom"]
    return _grouped_bars(summary, keys, {k: k for k in keys}, path,
                         "Gap and its parts (95% CI)", "percentage points", percent_axis=False)


def plot_gap_by_area(summary: pd.DataFrame, path: str | Path) -> Path | None:
    """The gap against the evidence's share of the image, one line per benchmark; n under each point."""
    rows = _overall(summary, [AREA_PREFIX + label for label in AREA_LABELS])
    if rows.empty:
        return None
    benches = sorted(rows["benchmark"].unique())
    labels = [lb for lb in AREA_LABELS if (rows["metric"] == AREA_PREFIX + lb).any()]
    fig, ax = _new_figure(max(3, len(labels) // 2 + 1), height=4.0)
    x = np.arange(len(labels))
    step = 0.25 / max(1, len(benches))
    for i, bench in enumerate(benches):
        sub = rows[rows["benchmark"] == bench].set_index("metric").reindex([AREA_PREFIX + lb for lb in labels])
        have = sub["value"].notna().to_numpy()
        xs = x[have] + (i - (len(benches) - 1) / 2) * step
        vals = sub["value"].to_numpy()[have] * 100
        color = BENCH_COLORS[i % len(BENCH_COLORS)]
        ax.errorbar(xs, vals, yerr=_yerr(sub[have], 100), marker="o", capsize=3, color=color, label=bench,
                    linewidth=1.2)
        for xi, vi, ni in zip(xs, vals, sub["n"].to_numpy()[have], strict=True):
            ax.annotate(f"n={int(ni)}", (xi, vi), textcoords="offset points", xytext=(4, -10), fontsize=6,
                        color=color)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, labels)
    ax.set_xlabel("evidence area (union box / image)")
    ax.set_ylabel("gap, crop − full (pp)")
    ax.set_title("Gap vs evidence size (95% CI)")
    ax.legend(fontsize=8, frameon=False, loc="best")
    path = Path(path)
    fig.savefig(path)
    return path


def plot_focus(summary: pd.DataFrame, path: str | Path) -> Path | None:
    """The attention share on the evidence (one layer) of right and wrong answers, per benchmark and view, with
    the evidence's mean area share (what a uniform spread gives it) marked on each group."""
    rows = summary[(summary["category"] == ALL) & summary["metric"].str.match(r"^focus_[a-z]+_share_(correct|wrong)$")]
    rows = rows[rows["value"].map(lambda v: isinstance(v, (int, float)) and math.isfinite(v))]
    if rows.empty:
        return None
    pairs = {(r.benchmark, r.metric.removeprefix("focus_").rsplit("_share_", 1)[0]) for r in rows.itertuples()}
    order = {v: i for i, v in enumerate(("full", "box", "crop", "selfcrop"))}
    groups = sorted(pairs, key=lambda g: (g[0], order.get(g[1], len(order)), g[1]))
    fig, ax = _new_figure(len(groups), height=4.0)
    x = np.arange(len(groups))
    indexed = summary[summary["category"] == ALL].set_index(["benchmark", "metric"])
    for i, (outcome, color) in enumerate((("correct", COLORS["crop"]), ("wrong", COLORS["box"]))):
        sub = indexed.reindex([(b, f"focus_{v}_share_{outcome}") for b, v in groups])
        have = sub["value"].notna().to_numpy()
        values = 100 * sub["value"].to_numpy()[have]
        bars = ax.bar(x[have] + (i - 0.5) * 0.4, values, 0.37, yerr=_yerr(sub[have], 100),
                      capsize=3, color=color, label=f"{outcome} answers", error_kw={"elinewidth": 1, "alpha": 0.8})
        ax.bar_label(bars, labels=[f"{v:.1f}\nn={int(n)}" for v, n in zip(values, sub["n"].to_numpy()[have],
                                                                          strict=True)],
                     fontsize=6, padding=2)
    area = indexed.reindex([(b, f"focus_{v}_area") for b, v in groups])["value"].to_numpy() * 100
    for xi, a in zip(x, area, strict=True):
        if math.isfinite(a):
            ax.hlines(a, xi - 0.42, xi + 0.42, colors="black", linestyles="--", linewidth=0.9,
                      label="evidence area (uniform)" if xi == x[0] else None)
    ax.set_xticks(x, [f"{b}\n{v}" for b, v in groups])
    ax.set_ylabel("attention share on the evidence (%)")
    ax.set_title("Attention share on the evidence vs correctness (95% CI)")
    ax.legend(fontsize=8, frameon=False, loc="best")
    path = Path(path)
    fig.savefig(path)
    return path


PLOTS = {"accuracy.png": plot_accuracy, "gap.png": plot_gap, "gap_by_area.png": plot_gap_by_area,
         "focus.png": plot_focus}


def plot_all(summary: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write every figure the summary supports into `out_dir`; returns {file name: path} of those written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, fn in PLOTS.items():
        path = fn(summary, out_dir / name)
        if path is not None:
            written[name] = path
    return written
