"""Focus and self-zoom numbers: per record (what `--focus` and the selfcrop view store) and per summary group.

A record's `focus` is {"layer", "share", "area", "layers"}: at the layer read (`attention.resolve_layer`), the
share of the answer position's image attention that falls on the evidence, and the evidence's share of the image
tokens (`attention.evidence_share`), both fractions in [0, 1]; `layers` holds the share of every captured layer
(for choosing a layer, `layer_profile`). The evidence is the boxes moved into the image the view showed. A
record gets no focus when that image is not a known function of the source image (a benchmark's own crop), when
the boxes cover no image token there (a selfcrop window that misses the evidence), or when the answer saw two
images (the paper's self-zoom); it gets {"error": reason} when the attention map was unusable.

Summary rows, per benchmark and category, for each view with focus (`<view>`), over the valid records whose
focus has numbers:
- `focus_<view>_share`, `focus_<view>_share_median`: mean and median share (percentile bootstrap CIs);
- `focus_<view>_area`, `focus_<view>_area_median`: the same for the evidence's area share, the uniform baseline;
- `focus_<view>_lift`: mean of share − area, paired per sample (bootstrap CI): above 0, more attention on the
  evidence than a uniform spread gives it;
- `focus_<view>_share_correct`, `focus_<view>_share_wrong`: mean share of right and of wrong answers;
- `focus_<view>_correct_minus_wrong`: their difference within evidence-area bins (`analysis.AREA_EDGES`),
  averaged with weights = samples per bin, over the bins that have both right and wrong answers (n = those
  samples); bootstrap CI resampling right and wrong answers within each bin. `focus_<view>_correct_minus_wrong:
  <bin>`: the same per bin. Larger evidence draws more attention and is answered better, so the unstratified
  difference mixes both;
- `focus_<view>_layer`: the layer read; `focus_<view>_errors`: records whose map was unusable (n = records with
  a focus entry).
And with the selfcrop view:
- `gap_selfzoom` = selfcrop − full on samples valid in both (paired bootstrap CI);
- `selfzoom_recovery` = (selfcrop − full) / (crop − full) on samples valid in all three: the share of the gap
  the training-free zoom recovers (bootstrap CI; NaN when crop − full is 0);
- on samples with boxes and a window: `selfcrop_hit` (the evidence centre inside the window; Wilson CI) beside
  `selfcrop_hit_random` (the exact probability that a window of the same size placed uniformly at random inside
  the image holds it, averaged) and `selfcrop_hit_over_random` (hit − that probability, paired bootstrap CI);
  `selfcrop_coverage` (share of the evidence inside the window) beside `selfcrop_coverage_random` and
  `selfcrop_coverage_over_random`; `selfcrop_iou` (window vs the union box of the evidence, which a window much
  larger than the evidence caps far below 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from vopd_bench import geometry, selfcrop, stats
from vopd_bench.attention import BadAttention, ImageAttention, evidence_share
from vopd_bench.geometry import Box
from vopd_bench.views import ViewConfig

if TYPE_CHECKING:
    import pandas as pd

FOCUS_PREFIX = "focus_"
SELF_METRICS = ("gap_selfzoom", "selfzoom_recovery", "selfcrop_hit", "selfcrop_hit_random", "selfcrop_hit_over_random",
                "selfcrop_coverage", "selfcrop_coverage_random", "selfcrop_coverage_over_random", "selfcrop_iou")


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


def record_focus(att: ImageAttention, boxes_shown: Sequence[Box], layer: int) -> dict | None:
    """A record's `focus` entry (module docstring); None when there is no evidence to measure in this image."""
    if not boxes_shown:
        return None
    try:
        es = evidence_share(att, boxes_shown)
    except BadAttention as e:
        return {"error": str(e)}
    if es is None:
        return None
    return {"layer": layer, "share": es.at(layer), "area": es.area,
            "layers": {str(k): v for k, v in zip(es.layers, es.shares, strict=True)}}


def has_share(f: object) -> bool:
    """A focus entry with numbers (not an error, not the ratio of runs before the share existed)."""
    return isinstance(f, dict) and "share" in f and "area" in f


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


def median_ci(values: np.ndarray, n_boot: int, seed: int) -> stats.Estimate:
    """Median with a percentile bootstrap interval (NaNs when empty)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return stats.Estimate(stats.NAN, stats.NAN, stats.NAN, 0)
    rng = np.random.default_rng(seed)
    reps = np.concatenate([np.median(v[rng.integers(0, v.size, (k, v.size))], axis=1)
                           for k in np.diff(np.r_[0:n_boot:256, n_boot])])  # in chunks: n_boot × n can be large
    lo, hi = stats.percentile_ci(reps)
    return stats.Estimate(float(np.median(v)), lo, hi, int(v.size))


def stratified_difference(values: np.ndarray, right: np.ndarray, strata: Sequence[object], n_boot: int,
                          seed: int) -> tuple[stats.Estimate, dict[object, stats.Estimate]]:
    """mean(values | right) − mean(values | wrong) within each stratum, averaged with weights = the stratum's
    size over the strata that have both; and the per-stratum differences. Bootstrap CIs resample the right and
    the wrong values of each stratum separately."""
    values, right = np.asarray(values, dtype=float), np.asarray(right, dtype=bool)
    strata = np.asarray(list(strata), dtype=object)
    per: dict[object, stats.Estimate] = {}
    parts = []  # (weight, value, replicates)
    for k, s in enumerate(dict.fromkeys(strata)):
        r, w = values[(strata == s) & right], values[(strata == s) & ~right]
        if not (r.size and w.size):
            continue
        reps = (stats.bootstrap_means(r[:, None], n_boot=n_boot, seed=seed + 2 * k)[:, 0]
                - stats.bootstrap_means(w[:, None], n_boot=n_boot, seed=seed + 2 * k + 1)[:, 0])
        value = float(r.mean() - w.mean())
        per[s] = stats.Estimate(value, *stats.percentile_ci(reps), int(r.size + w.size))
        parts.append((r.size + w.size, value, reps))
    if not parts:
        return stats.Estimate(stats.NAN, stats.NAN, stats.NAN, 0), per
    weights = np.array([p[0] for p in parts], dtype=float)
    value = float(np.dot(weights, [p[1] for p in parts]) / weights.sum())
    reps = np.stack([p[2] for p in parts], axis=1) @ weights / weights.sum()
    return stats.Estimate(value, *stats.percentile_ci(reps), int(weights.sum())), per


def focus_rows(bench: str, cat: str, rdf: pd.DataFrame, views: Sequence[str], n_boot: int, seed: int,
               area_bin: Callable[[float], str | None], area_labels: Sequence[str]) -> list[dict]:
    """The focus rows of one group of records (`analysis.records_frame` rows, with `valid` and `right`).
    `area_bin` names the evidence-size bin of a relative area; `area_labels` orders the bins."""
    if "focus" not in rdf:
        return []
    rows = []
    for view in views:
        # an entry with numbers or with the reason its map was unusable; entries of the earlier ratio are not read
        tried = rdf[(rdf["view"] == view) & rdf["valid"]
                    & rdf["focus"].map(lambda f: has_share(f) or (isinstance(f, dict) and "error" in f))]
        v = tried[tried["focus"].map(has_share)]
        if tried.empty:
            continue
        name = f"{FOCUS_PREFIX}{view}"
        if v.empty:
            rows.append(_row(bench, cat, f"{name}_errors", len(tried), n=len(tried)))
            continue
        share = v["focus"].map(lambda f: f["share"]).to_numpy(dtype=float)
        area = v["focus"].map(lambda f: f["area"]).to_numpy(dtype=float)
        right = v["right"].to_numpy(dtype=bool)
        rows += [_est(bench, cat, f"{name}_share", mean_ci(share, n_boot, seed)),
                 _est(bench, cat, f"{name}_share_median", median_ci(share, n_boot, seed)),
                 _est(bench, cat, f"{name}_area", mean_ci(area, n_boot, seed)),
                 _est(bench, cat, f"{name}_area_median", median_ci(area, n_boot, seed)),
                 _est(bench, cat, f"{name}_lift", mean_ci(share - area, n_boot, seed)),
                 _est(bench, cat, f"{name}_share_correct", mean_ci(share[right], n_boot, seed)),
                 _est(bench, cat, f"{name}_share_wrong", mean_ci(share[~right], n_boot, seed))]
        bins = _evidence_area(v).map(area_bin).to_numpy(dtype=object)
        total, per = stratified_difference(share, right, bins, n_boot, seed)
        rows.append(_est(bench, cat, f"{name}_correct_minus_wrong", total))
        rows += [_est(bench, cat, f"{name}_correct_minus_wrong:{label}", per[label]) for label in area_labels
                 if label in per]
        layers = set(v["focus"].map(lambda f: f.get("layer")))
        rows.append(_row(bench, cat, f"{name}_layer", layers.pop() if len(layers) == 1 else stats.NAN, n=len(v)))
        rows.append(_row(bench, cat, f"{name}_errors", len(tried) - len(v), n=len(tried)))
    return rows


def _evidence_area(v: pd.DataFrame) -> pd.Series:
    """The records' evidence area (union box over the image, source pixels) as numbers, NaN where unknown."""
    import pandas as pd

    return pd.to_numeric(v["evidence_area"], errors="coerce")


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
        rows += window_rows(bench, cat, sc, n_boot, seed)
    return rows


def window_rows(bench: str, cat: str, sc: pd.DataFrame, n_boot: int, seed: int) -> list[dict]:
    """Hit, coverage and IoU of the selfcrop windows against the evidence, with the chance levels of random
    windows of the same sizes (module docstring)."""
    hits, covs, ious, p_hit, p_cov = [], [], [], [], []
    for w, bs, size in zip(sc["window"], sc["boxes"], sc["image_size"], strict=True):
        w, bs = tuple(w), [tuple(b) for b in bs]
        hits.append(int(selfcrop.hit(w, bs)))
        covs.append(selfcrop.coverage(w, bs))
        ious.append(selfcrop.iou(w, geometry.union(bs)))
        ph, pc = selfcrop.random_window_chances(w, bs, (size[0], size[1]))
        p_hit.append(ph)
        p_cov.append(pc)
    hits_a, p_hit_a, covs_a, p_cov_a = (np.array(x, dtype=float) for x in (hits, p_hit, covs, p_cov))
    return [_est(bench, cat, "selfcrop_hit", stats.proportion(hits)),
            _est(bench, cat, "selfcrop_hit_random", mean_ci(p_hit_a, n_boot, seed)),
            _est(bench, cat, "selfcrop_hit_over_random", mean_ci(hits_a - p_hit_a, n_boot, seed)),
            _est(bench, cat, "selfcrop_coverage", mean_ci(covs_a, n_boot, seed)),
            _est(bench, cat, "selfcrop_coverage_random", mean_ci(p_cov_a, n_boot, seed)),
            _est(bench, cat, "selfcrop_coverage_over_random", mean_ci(covs_a - p_cov_a, n_boot, seed)),
            _est(bench, cat, "selfcrop_iou", mean_ci(np.array(ious), n_boot, seed))]


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
    """(benchmark, sample_id, view) -> {"category", "focus"} for valid records with a focus share, the last one
    winning."""
    out = {}
    for r in records:
        d = r if isinstance(r, dict) else vars(r)
        if d.get("error") is None and has_share(d.get("focus")):
            out[(d["benchmark"], str(d["sample_id"]), d["view"])] = {"category": d.get("category"), "focus": d["focus"]}
    return out


def before_after_rows(before: Sequence, after: Sequence, *, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Rows of `before_after.csv` for the focus of each view, on the samples with a focus share in both runs:
    `focus_<view>_share` (mean share on the evidence) and `focus_<view>_lift` (mean share − area). The CI of each
    delta is a paired bootstrap over those samples."""
    b, a = _focus_by_sample(before), _focus_by_sample(after)
    keys = sorted(set(b) & set(a))
    rows = []
    for bench in dict.fromkeys(k[0] for k in keys):
        for view in dict.fromkeys(k[2] for k in keys if k[0] == bench):
            ks = [k for k in keys if k[0] == bench and k[2] == view]
            cats = sorted({b[k]["category"] for k in ks if b[k]["category"] is not None})
            for cat, sub in [("all", ks)] + [(c, [k for k in ks if b[k]["category"] == c]) for c in cats]:
                for metric, value in ((f"focus_{view}_share", lambda f: f["share"]),
                                      (f"focus_{view}_lift", lambda f: f["share"] - f["area"])):
                    mat = np.array([[value(b[k]["focus"]), value(a[k]["focus"])] for k in sub], dtype=float)
                    reps = stats.bootstrap_means(mat, n_boot=n_boot, seed=seed)
                    lo, hi = stats.percentile_ci(reps[:, 1] - reps[:, 0])
                    before_v, after_v = mat.mean(axis=0)
                    rows.append({"benchmark": bench, "category": cat, "metric": metric, "before": float(before_v),
                                 "after": float(after_v), "delta": float(after_v - before_v), "ci_low": lo,
                                 "ci_high": hi, "n": len(sub)})
    return rows


def layer_profile(records: Sequence, view: str = "full", *, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Per captured layer, the mean lift (share − area) of the view's valid records with a focus share, with a
    bootstrap CI: the data for choosing `--focus-layer` on a validation split (`vopd focus-layers`)."""
    per_layer: dict[int, list[float]] = {}
    for r in records:
        d = r if isinstance(r, dict) else vars(r)
        f = d.get("focus")
        if d.get("view") != view or d.get("error") is not None or not has_share(f):
            continue
        for layer, share in (f.get("layers") or {}).items():
            per_layer.setdefault(int(layer), []).append(share - f["area"])
    rows = []
    for layer in sorted(per_layer):
        e = mean_ci(np.array(per_layer[layer]), n_boot, seed)
        rows.append({"layer": layer, "lift": e.value, "ci_low": e.ci_low, "ci_high": e.ci_high, "n": e.n})
    return rows
