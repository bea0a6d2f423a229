"""Figures that set runs side by side: the leaderboard, before/after, and training curves.

Same style as `vopd_bench.plots` (its colours, labels and resolution; `Figure` + Agg, no pyplot state):
accuracies in %, gaps in percentage points, error bars are 95% intervals. Each function returns the path it
wrote, or None when there is nothing to draw.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vopd_bench.plots import BENCH_COLORS, COLORS, DPI, LABELS


def _style(ax) -> None:
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _wrap(text: str, width: int) -> str:
    """A label or title broken into lines of at most `width` characters (a long run name must not run off the
    canvas)."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False)) or text


def _finite(x: object) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


# ---- leaderboard --------------------------------------------------------------------------------------------


_TABLE_HATCH = {"v2 Table 1": "//", "v1 Table 1": "\\\\", "v1 Fig. 3": ".."}
_TABLE_PREFERENCE = ("v2 Table 1", "v1 Table 1", "v1 Fig. 3")  # v2 first: it restates v1 on shared columns


def _split_label(label: str) -> tuple[str, str | None]:
    """`Qwen3.5-4B (paper v1 Table 1)` -> ("Qwen3.5-4B", "v1 Table 1"); a measured model -> (label, None)."""
    if label.endswith(")") and " (paper " in label:
        model, _, table = label[:-1].partition(" (paper ")
        return model, table
    return label, None


def _chart_published(pub: pd.DataFrame, cells: list[str], models: Sequence[str]) -> pd.DataFrame:
    """Per chosen model, the published rows that add a value the chart shows, preferring v2 (which repeats
    v1's values on the columns both have) so no number is drawn twice."""
    keep = []
    for model in models:
        covered: set[str] = set()
        rows = {_split_label(str(r["model"]))[1]: idx for idx, r in pub.iterrows()
                if _split_label(str(r["model"]))[0] == model}
        for table in _TABLE_PREFERENCE:
            if table not in rows:
                continue
            r = pub.loc[rows[table]]
            new = {c for c in cells if c in r and _finite(r[c])} - covered
            if new:
                keep.append(rows[table])
                covered |= new
    return pub.loc[keep]


def plot_leaderboard(df: pd.DataFrame, path: str | Path, benchmarks: Sequence[str],
                     published_models: Sequence[str] = ()) -> Path | None:
    """Full-image accuracy and gap per benchmark, one bar per leaderboard row that has the value.

    `benchmarks` are the leaderboard's benchmarks in column order (the leaderboard module knows its column
    names; this one only draws). Only benchmarks with a measured value are drawn. Published rows are drawn only
    for `published_models`, hatched (one hatch per paper table), in one colour per model, so the chart stays
    legible.
    """
    measured = df[df["source"] == "measured"]
    benches = [b for b in benchmarks if f"{b}:full" in measured and measured[f"{b}:full"].notna().any()]
    if not benches:
        return None
    cells = [f"{b}:{k}" for b in benches for k in ("full", "gap")]
    rows = pd.concat([measured, _chart_published(df[df["source"] == "published"], cells, published_models)])
    def who(r: pd.Series) -> tuple[str, str | None]:
        """(what the bar is called, the paper table or None): a measured run by its label, a published row by its
        model, so that one model's tables share a colour and two runs of one model do not."""
        if r["source"] == "measured":
            return str(r["label"]), None
        return _split_label(str(r["model"]))

    colours: dict[str, str] = {}
    for _, r in rows.iterrows():
        colours.setdefault(who(r)[0], BENCH_COLORS[len(colours) % len(BENCH_COLORS)])
    panels = [(k, title) for k, title in (("full", "accuracy, full image (%)"), ("gap", "gap, crop − full (pp)"))
              if any(f"{b}:{k}" in rows and rows[f"{b}:{k}"].notna().any() for b in benches)]

    n_slots = max(sum(any(_finite(r.get(f"{b}:{k}")) for b in benches) for _, r in rows.iterrows()) for k, _ in panels)
    fig = Figure(figsize=(max(6.0, 2.0 + 0.5 * len(benches) * (n_slots + 1)) + 2.6, 3.3 * len(panels)),
                 dpi=DPI, layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    x = np.arange(len(benches))
    handles: dict[str, object] = {}
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        _style(ax)
        signed = key == "gap"
        drawn = [r for _, r in rows.iterrows() if any(_finite(r.get(f"{b}:{key}")) for b in benches)]
        width = 0.8 / len(drawn)
        for i, r in enumerate(drawn):
            vals = np.array([r.get(f"{b}:{key}", np.nan) for b in benches], dtype=float) * 100
            have = np.isfinite(vals)
            name, table = who(r)
            style: dict = {"color": colours[name]}
            if table is None:  # measured: solid, with its 95% interval
                errs = np.array([r.get(f"{b}:{key}:ci", np.nan) for b in benches], dtype=float)[have] * 100
                style |= {"yerr": np.nan_to_num(errs), "capsize": 2, "error_kw": {"elinewidth": 1, "alpha": 0.8}}
            else:  # published: hatched and lighter, no interval (the paper gives none)
                style |= {"alpha": 0.6, "hatch": _TABLE_HATCH.get(table, "//"), "edgecolor": "white"}
            label = name if table is None else str(r["model"])
            xs = x[have] + (i - (len(drawn) - 1) / 2) * width
            bars = ax.bar(xs, vals[have], width * 0.92, label=label, **style)
            handles.setdefault(label, bars)
            ax.bar_label(bars, labels=[f"{v:+.1f}" if signed else f"{v:.1f}" for v in vals[have]], fontsize=6,
                         padding=2)
        ax.set_xticks(x, benches)
        ax.set_ylabel(ylabel)
        if signed:
            ax.axhline(0, color="black", linewidth=0.8)
        else:
            ax.set_ylim(0, 105)
    width_in = fig.get_figwidth()
    fig.suptitle(_wrap("Leaderboard (error bars: 95% CI; hatched: the paper's published numbers, not measured)",
                       int(width_in * 11)), fontsize=10)
    # Below the panels, where no title is: a legend at the top right ran into the title.
    fig.legend(list(handles.values()), [_wrap(h, 36) for h in handles], fontsize=7, frameon=False,
               loc="outside lower center", ncols=max(1, min(len(handles), int(width_in // 2.6))))
    path = Path(path)
    fig.savefig(path)
    return path


# ---- before / after -----------------------------------------------------------------------------------------

_COMPARE_METRICS = ("acc_full", "acc_crop", "acc_box", "gap", "gap_locate", "gap_zoom")
_SHORT = {"acc_full": "full", "acc_crop": "crop", "acc_box": "box", "gap": "gap", "gap_locate": "locate",
          "gap_zoom": "zoom"}


def plot_before_after(cmp: pd.DataFrame, path: str | Path, label_a: str = "before",
                      label_b: str = "after") -> Path | None:
    """Two panels from `compare_records` rows (category `all`): the values of A and B side by side, and the
    paired difference B − A with its 95% paired-bootstrap interval (McNemar p over accuracy differences)."""
    rows = cmp[(cmp["category"] == "all") & cmp["metric"].isin(_COMPARE_METRICS) & cmp["n"].gt(0)]
    if rows.empty:
        return None
    order = {m: i for i, m in enumerate(_COMPARE_METRICS)}
    rows = rows.assign(_o=rows["metric"].map(order)).sort_values(["benchmark", "_o"])
    labels = [f"{_SHORT[m]}\n{b}" for b, m in zip(rows["benchmark"], rows["metric"], strict=True)]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 1.5 + 0.75 * len(rows)), 6.4), dpi=DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for ax in (top, bottom):
        _style(ax)
        ax.axhline(0, color="black", linewidth=0.8)
    w = 0.38
    for off, col, alpha in ((-w / 2, "a", 0.5), (w / 2, "b", 1.0)):
        colors = [COLORS.get(m.removeprefix("acc_"), "#4C72B0") for m in rows["metric"]]
        bars = top.bar(x + off, rows[col] * 100, w * 0.95, color=colors, alpha=alpha,
                       hatch="//" if col == "a" else None, edgecolor="white" if col == "a" else None)
        top.bar_label(bars, labels=[f"{v * 100:.1f}" for v in rows[col]], fontsize=6, padding=2)
    # Legend patches for the two runs (colour encodes the quantity, hatch the run).
    width_in = fig.get_figwidth()
    names = [_wrap(f"A: {label_a}", int(width_in * 6)), _wrap(f"B: {label_b}", int(width_in * 6))]
    patches = [top.bar([np.nan], [np.nan], color="#999999", alpha=0.5, hatch="//", edgecolor="white"),
               top.bar([np.nan], [np.nan], color="#999999")]
    for ax in (top, bottom):  # separate the benchmarks
        for xb in np.flatnonzero(rows["benchmark"].to_numpy()[1:] != rows["benchmark"].to_numpy()[:-1]):
            ax.axvline(xb + 0.5, color="#999999", linewidth=0.8, linestyle="--")
    top.set_ylabel("accuracy % / gap pp")
    # The run names go in the legend, below the panels, where a long name wraps instead of running off the canvas.
    fig.suptitle("Before / after, B − A on the samples both runs share", fontsize=10)
    fig.legend(patches, names, fontsize=8, frameon=False, loc="outside lower center", ncols=2)

    diff = rows["diff"].to_numpy() * 100
    lo = (rows["diff"] - rows["ci_low"]).clip(lower=0).fillna(0).to_numpy() * 100
    hi = (rows["ci_high"] - rows["diff"]).clip(lower=0).fillna(0).to_numpy() * 100
    colors = [COLORS.get(m.removeprefix("acc_"), "#4C72B0") for m in rows["metric"]]
    for xi, d, l_, h_, c in zip(x, diff, lo, hi, colors, strict=True):
        bottom.errorbar([xi], [d], yerr=[[l_], [h_]], fmt="o", color=c, capsize=4, markersize=6)
    for xi, d, p in zip(x, diff, rows["mcnemar_p"], strict=True):
        text = f"{d:+.1f}" + (f"\np={p:.3g}" if _finite(p) else "")
        bottom.annotate(text, (xi, d), textcoords="offset points", xytext=(8, -4), fontsize=6)
    bottom.set_ylabel("B − A (pp), 95% CI")
    bottom.set_xticks(x, labels, fontsize=7)
    path = Path(path)
    fig.savefig(path)
    return path


# ---- training curves ----------------------------------------------------------------------------------------


def _smooth(values: np.ndarray) -> np.ndarray:
    """A centred moving average over ~5% of the points: it shows the trend without lagging behind it."""
    window = max(3, len(values) // 20)
    return pd.Series(values).rolling(window, center=True, min_periods=1).mean().to_numpy()


def plot_training_curves(history: Sequence[Mapping[str, object]], path: str | Path,
                         keys: Sequence[str] | None = None, title: str = "Training",
                         x_key: str = "step") -> Path | None:
    """One small panel per metric against `x_key` (default `step`).

    `history` is a list of per-step dicts such as `{"step": 10, "loss": 0.41, "lr": 1e-5, "gap": 0.12}`;
    a dict may omit keys (e.g. an evaluation logged every N steps). `keys` picks and orders the panels
    (default: every numeric key except `x_key`, in first-seen order). Dense series (≥ 20 points) get a
    centred moving average over the faint raw line, except schedules (`lr*`), which are exact; sparse ones
    are drawn with markers. Keys named `gap*`/`acc*` are taken as fractions and shown in pp / %.
    """
    if keys is None:
        keys = []
        for h in history:
            for k, v in h.items():
                if k != x_key and k not in keys and _finite(v) and not isinstance(v, bool):
                    keys.append(k)
    series = {}
    for k in keys:
        pts = [(float(h[x_key]), float(h[k])) for h in history if _finite(h.get(x_key)) and _finite(h.get(k))]
        if pts:
            series[k] = np.array(pts)
    if not series:
        return None
    n = len(series)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig = Figure(figsize=(3.6 * cols, 2.6 * nrows), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    for i, (ax, (k, pts)) in enumerate(zip(axes, series.items(), strict=False)):
        _style(ax)
        xs, ys = pts[:, 0], pts[:, 1]
        scale = 100.0 if k.startswith(("gap", "acc")) else 1.0
        color = COLORS.get(k, BENCH_COLORS[i % len(BENCH_COLORS)])
        if len(xs) >= 20 and not k.startswith("lr"):
            ax.plot(xs, ys * scale, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(xs, _smooth(ys) * scale, color=color, linewidth=1.6)
        elif len(xs) >= 20:
            ax.plot(xs, ys * scale, color=color, linewidth=1.4)
        else:
            ax.plot(xs, ys * scale, color=color, marker="o", markersize=3, linewidth=1.2)
        if k.startswith("gap"):
            ax.axhline(0, color="black", linewidth=0.8)
        if (ys > 0).all() and ys.max() / ys.min() > 1e3:  # e.g. a loss falling by orders of magnitude
            ax.set_yscale("log")
        ax.set_title(LABELS.get(k, k) + (" (%)" if k.startswith("acc") else " (pp)" if k.startswith("gap") else ""),
                     fontsize=9, pad=12)  # room for a scientific-notation offset such as 1e-5
        ax.set_xlabel(x_key, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path
