"""Focus and self-zoom numbers: per record (what `--focus` and the selfcrop view store) and per summary group.

A record's `focus` is {"early", "middle", "late"}: the attention ratio (`attention.attention_ratio`) of each
layer band, on the image the view showed, with the evidence boxes moved into that image. Views whose image
is not a known function of the source image (a benchmark's own crop) get none.

Summary rows, per benchmark and category, for each view with focus (`<view>`) — ratios use the middle band
unless named:
- `focus_<view>`: mean ratio, with a percentile bootstrap CI over samples; `focus_<view>_early`, `_late`: the
  other bands.
- `focus_<view>_correct`, `focus_<view>_wrong`: the mean ratio over right and wrong answers.
- `focus_<view>_above1`: share of samples whose ratio exceeds 1 (Wilson CI).
And with the selfcrop view:
- `gap_selfzoom` = selfcrop − full on samples valid in both (paired bootstrap CI);
- `selfzoom_recovery` = (selfcrop − full) / (crop − full) on samples valid in all three: the share of the gap
  the training-free zoom recovers (bootstrap CI; NaN when crop − full is 0);
- `selfcrop_iou`: mean IoU of the window with the union of the evidence boxes; `selfcrop_hit`: share of
  windows holding the evidence centre (Wilson CI). Only samples with boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from vopd_bench import geometry, selfcrop, stats
from vopd_bench.attention import BANDS, DEFAULT_BAND, ImageAttention, band_ratios
from vopd_bench.geometry import Box
from vopd_bench.views import ViewConfig

if TYPE_CHECKING:
    import pandas as pd

FOCUS_PREFIX = "focus_"
SELF_METRICS = ("gap_selfzoom", "selfzoom_recovery", "selfcrop_iou", "selfcrop_hit")


def boxes_in_view(view: str, boxes: Sequence[Box], image_size: tuple[int, int], cfg: ViewConfig,
                  window: Box | None = None) -> list[Box]:
    """The evidence boxes in the pixels of the image this view showed (empty when they are not known there)."""
    if not boxes:
        return []
    if view in ("full", "box"):
        return [tuple(b) for b in boxes]
    if view == "crop":
        region = geometry.crop_region(boxes, image_size[0], image_size[1], cfg.context, cfg.min_side)
    elif view == "selfcrop" and window is not None:
        region = window
    else:
        return []
    x0, y0, x1, y1 = region
    out = []
    for b in boxes:  # clip to the region, then shift and scale as the crop was resized
        c = (max(b[0], x0), max(b[1], y0), min(b[2], x1), min(b[3], y1))
        if c[2] > c[0] and c[3] > c[1]:
            out.append(tuple((v - o) * cfg.zoom for v, o in zip(c, (x0, y0, x0, y0), strict=True)))
    return out


def record_focus(att: ImageAttention, boxes_shown: Sequence[Box]) -> dict[str, float] | None:
    return band_ratios(att, boxes_shown) if boxes_shown else None


# ---- summary --------------------------------------------------------------------------------------------------


def _row(bench: str, cat: str, metric: str, value: float, lo: float = stats.NAN, hi: float = stats.NAN,
         n: int = 0) -> dict:
    return {"benchmark": bench, "category": cat, "metric": metric, "value": float(value), "ci_low": float(lo),
            "ci_high": float(hi), "n": int(n)}


def mean_ci(values: np.ndarray, n_boot: int, seed: int) -> stats.Estimate:
    """Mean with a percentile bootstrap interval over the values (NaNs when empty)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return stats.Estimate(stats.NAN, stats.NAN, stats.NAN, 0)
    lo, hi = stats.percentile_ci(stats.bootstrap_means(v[:, None], n_boot=n_boot, seed=seed)[:, 0])
    return stats.Estimate(float(v.mean()), lo, hi, int(v.size))


def _est(bench: str, cat: str, metric: str, e: stats.Estimate) -> dict:
    return _row(bench, cat, metric, e.value, e.ci_low, e.ci_high, e.n)


def focus_rows(bench: str, cat: str, rdf: pd.DataFrame, views: Sequence[str], n_boot: int, seed: int) -> list[dict]:
    """The focus rows of one group of records (`analysis.records_frame` rows, with `valid` and `right`)."""
    if "focus" not in rdf:
        return []
    rows = []
    for view in views:
        v = rdf[(rdf["view"] == view) & rdf["valid"] & rdf["focus"].map(lambda f: isinstance(f, dict))]
        if v.empty:
            continue
        band = {b: v["focus"].map(lambda f, b=b: f[b]).to_numpy(dtype=float) for b in BANDS}
        mid, right = band[DEFAULT_BAND], v["right"].to_numpy(dtype=bool)
        name = f"{FOCUS_PREFIX}{view}"
        rows.append(_est(bench, cat, name, mean_ci(mid, n_boot, seed)))
        rows += [_est(bench, cat, f"{name}_{b}", mean_ci(band[b], n_boot, seed)) for b in BANDS if b != DEFAULT_BAND]
        rows.append(_est(bench, cat, f"{name}_correct", mean_ci(mid[right], n_boot, seed)))
        rows.append(_est(bench, cat, f"{name}_wrong", mean_ci(mid[~right], n_boot, seed)))
        rows.append(_est(bench, cat, f"{name}_above1", stats.proportion((mid > 1).astype(int))))
    return rows


def selfzoom_rows(bench: str, cat: str, st: pd.DataFrame, rdf: pd.DataFrame, n_boot: int, seed: int) -> list[dict]:
    """The self-zoom rows from the sample table (`analysis.sample_table`) and the records of one group."""
    if "ok_selfcrop" not in st or "ok_full" not in st:
        return []
    rows = []
    both = st[st["ok_full"] & st["ok_selfcrop"]]
    rows.append(_est(bench, cat, "gap_selfzoom", stats.paired_diff(both["right_selfcrop"].to_numpy(),
                                                                   both["right_full"].to_numpy(),
                                                                   n_boot=n_boot, seed=seed)))
    if "ok_crop" in st:
        three = st[st["ok_full"] & st["ok_selfcrop"] & st["ok_crop"]]
        rows.append(_recovery_row(bench, cat, three, n_boot, seed))
    sc = rdf[(rdf["view"] == "selfcrop") & rdf["valid"] & rdf["window"].map(bool) & rdf["boxes"].map(bool)]
    if not sc.empty:
        pairs = [(tuple(w), [tuple(b) for b in bs]) for w, bs in zip(sc["window"], sc["boxes"], strict=True)]
        ious = [selfcrop.iou(w, geometry.union(bs)) for w, bs in pairs]
        hits = [int(selfcrop.hit(w, bs)) for w, bs in pairs]
        rows.append(_est(bench, cat, "selfcrop_iou", mean_ci(np.array(ious), n_boot, seed)))
        rows.append(_est(bench, cat, "selfcrop_hit", stats.proportion(hits)))
    return rows


def _recovery_row(bench: str, cat: str, three: pd.DataFrame, n_boot: int, seed: int) -> dict:
    n = len(three)
    if n == 0:
        return _row(bench, cat, "selfzoom_recovery", stats.NAN)
    out = three[["right_full", "right_crop", "right_selfcrop"]].to_numpy(dtype=float)
    full, crop, self_ = out.mean(axis=0)
    value = (self_ - full) / (crop - full) if crop != full else stats.NAN
    reps = stats.bootstrap_means(out, n_boot=n_boot, seed=seed)
    denom = reps[:, 1] - reps[:, 0]
    ratios = np.divide(reps[:, 2] - reps[:, 0], denom, out=np.full(len(reps), np.nan), where=denom != 0)
    ratios = ratios[np.isfinite(ratios)]
    lo, hi = stats.percentile_ci(ratios) if ratios.size and math.isfinite(value) else (stats.NAN, stats.NAN)
    return _row(bench, cat, "selfzoom_recovery", value, lo, hi, n)


# ---- before / after ------------------------------------------------------------------------------------------


def _focus_by_sample(records: Sequence) -> dict[tuple[str, str, str], dict]:
    """(benchmark, sample_id, view) -> {"category", "focus"} for valid records with focus, the last one winning."""
    out = {}
    for r in records:
        d = r if isinstance(r, dict) else vars(r)
        if d.get("error") is None and isinstance(d.get("focus"), dict):
            out[(d["benchmark"], str(d["sample_id"]), d["view"])] = {"category": d.get("category"), "focus": d["focus"]}
    return out


def before_after_rows(before: Sequence, after: Sequence, *, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Rows of `before_after.csv` for the focus of each view and band, on the samples with focus in both runs:
    `focus_<view>` (middle band), `focus_<view>_early`, `_late` (mean ratios) and `focus_<view>_above1`
    (share of ratios > 1). The CI of each delta is a paired bootstrap over those samples."""
    b, a = _focus_by_sample(before), _focus_by_sample(after)
    keys = sorted(set(b) & set(a))
    rows = []
    for bench in dict.fromkeys(k[0] for k in keys):
        for view in dict.fromkeys(k[2] for k in keys if k[0] == bench):
            ks = [k for k in keys if k[0] == bench and k[2] == view]
            cats = sorted({b[k]["category"] for k in ks if b[k]["category"] is not None})
            for cat, sub in [("all", ks)] + [(c, [k for k in ks if b[k]["category"] == c]) for c in cats]:
                for metric, band, above in ((f"focus_{view}", DEFAULT_BAND, False),
                                            *((f"focus_{view}_{x}", x, False) for x in BANDS if x != DEFAULT_BAND),
                                            (f"focus_{view}_above1", DEFAULT_BAND, True)):
                    mat = np.array([[b[k]["focus"][band], a[k]["focus"][band]] for k in sub], dtype=float)
                    if above:
                        mat = (mat > 1).astype(float)
                    reps = stats.bootstrap_means(mat, n_boot=n_boot, seed=seed)
                    lo, hi = stats.percentile_ci(reps[:, 1] - reps[:, 0])
                    before_v, after_v = mat.mean(axis=0)
                    rows.append({"benchmark": bench, "category": cat, "metric": metric, "before": float(before_v),
                                 "after": float(after_v), "delta": float(after_v - before_v), "ci_low": lo,
                                 "ci_high": hi, "n": len(sub)})
    return rows
