"""Did the gap close? gap-report on held-out data for the starting model and for the result, compared sample
by sample.

`before_after.csv` has one row per (benchmark, category, metric) with columns `benchmark, category, metric,
before, after, delta, ci_low, ci_high, n`. Metrics: `acc_full`, `acc_crop`, `acc_box`, `gap` (crop − full),
`gap_locate` (box − full), `gap_zoom` (crop − box) and `mean_full_crop` ((full + crop) / 2). Each metric is
computed on the samples that have a valid answer for every view it uses in *both* runs (n), and the CI of the
delta comes from a paired bootstrap over those samples: a sample's before and after answers are resampled
together. With `focus`, the rows of `vopd_bench.focus.before_after_rows` follow: where each view's attention
went, before and after.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vopd_bench import stats
from vopd_bench.records import Record

COLUMNS = ["benchmark", "category", "metric", "before", "after", "delta", "ci_low", "ci_high", "n"]
# Each metric is a linear combination of per-view accuracies.
METRICS: dict[str, dict[str, float]] = {
    "acc_full": {"full": 1.0},
    "acc_crop": {"crop": 1.0},
    "acc_box": {"box": 1.0},
    "gap": {"crop": 1.0, "full": -1.0},
    "gap_locate": {"box": 1.0, "full": -1.0},
    "gap_zoom": {"crop": 1.0, "box": -1.0},
    "mean_full_crop": {"full": 0.5, "crop": 0.5},
}


def _outcomes(records: Iterable[Record | Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(benchmark, sample_id) -> {"category": ..., view: 0/1}, valid answers only, the last record winning."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        d = r if isinstance(r, Mapping) else r.__dict__
        if d.get("error") is not None or d.get("correct") is None:
            continue
        entry = out.setdefault((d["benchmark"], d["sample_id"]), {"category": d.get("category")})
        entry[d["view"]] = int(bool(d["correct"]))
    return out


def before_after_table(before: Iterable[Record | Mapping[str, Any]], after: Iterable[Record | Mapping[str, Any]],
                       *, n_boot: int = 2000, seed: int = 0):
    """The paired comparison of two gap-report runs over the same samples, as a DataFrame with `COLUMNS`."""
    import pandas as pd

    b, a = _outcomes(before), _outcomes(after)
    keys = sorted(set(b) & set(a))
    rows = []
    benches = list(dict.fromkeys(k[0] for k in keys))
    for bench in benches:
        in_bench = [k for k in keys if k[0] == bench]
        cats = sorted({b[k]["category"] for k in in_bench if b[k]["category"] is not None})
        groups = [("all", in_bench)] + [(c, [k for k in in_bench if b[k]["category"] == c]) for c in cats]
        for cat, ks in groups:
            for metric, coef in METRICS.items():
                views = list(coef)
                usable = [k for k in ks if all(v in b[k] and v in a[k] for v in views)]
                if not usable:
                    continue
                mat = np.array([[b[k][v] for v in views] + [a[k][v] for v in views] for k in usable], dtype=float)
                w = np.array([coef[v] for v in views])
                means = mat.mean(0)
                before_v, after_v = float(means[:len(views)] @ w), float(means[len(views):] @ w)
                reps = stats.bootstrap_means(mat, n_boot=n_boot, seed=seed)
                lo, hi = stats.percentile_ci(reps[:, len(views):] @ w - reps[:, :len(views)] @ w)
                rows.append({"benchmark": bench, "category": cat, "metric": metric, "before": before_v,
                             "after": after_v, "delta": after_v - before_v, "ci_low": lo, "ci_high": hi,
                             "n": len(usable)})
    return pd.DataFrame(rows, columns=COLUMNS)


@dataclass
class Remeasure:
    table: Any  # DataFrame with COLUMNS
    before_dir: Path
    after_dir: Path
    csv: Path
    plot: Path


def remeasure(base_model: str, trained_model: str | Path, benchmarks: list[str], out: Path, *, limit: int | None = None,
              batch_size: int = 16, max_new_tokens: int = 32, trust_remote_code: bool = False,
              quiet: bool = False, data_dir: str | None = None, focus: bool = False) -> Remeasure | None:
    """Run gap-report for both models (each resumable in its own folder) and write the comparison."""
    from vopd_bench.runner import GapReportConfig, run_gap_report
    from vopd_train.plots import plot_before_after

    runs = {}
    for name, model in (("before", base_model), ("after", str(trained_model))):
        cfg = GapReportConfig(model=model, benchmarks=list(benchmarks), limit=limit, batch_size=batch_size,
                              max_new_tokens=max_new_tokens, out=str(out / name),
                              trust_remote_code=trust_remote_code, quiet=quiet, data_dir=data_dir, focus=focus)
        runs[name] = run_gap_report(cfg)
    if runs["after"].summary is None:  # another rank of a torchrun job: rank 0 has the records and compares
        return None
    table = before_after_table(runs["before"].records, runs["after"].records)
    if focus:
        import pandas as pd

        from vopd_bench.focus import before_after_rows

        extra = pd.DataFrame(before_after_rows(runs["before"].records, runs["after"].records), columns=COLUMNS)
        table = pd.concat([table, extra], ignore_index=True) if not extra.empty else table
    csv = out / "before_after.csv"
    table.to_csv(csv, index=False)
    plot = out / "before_after.png"
    if not table.empty:
        plot_before_after(table, plot)
    return Remeasure(table, runs["before"].out_dir, runs["after"].out_dir, csv, plot)


def held_out_benchmarks(data_kind: str, data_benchmarks: list[str], requested: str) -> list[str]:
    """`--remeasure-benchmarks` when given; for synthetic training data the synthetic test split (validation when the
    prompts came from the test split); otherwise none."""
    chosen = [b.strip() for b in requested.split(",") if b.strip()]
    if chosen:
        return chosen
    if data_benchmarks and all(b.split(":")[0] == "synthetic" for b in data_benchmarks):
        # failures gathered on the test split itself are not held out from it: measure on validation then
        trained_on_test = any(b in ("synthetic", "synthetic:test") for b in data_benchmarks)
        return ["synthetic:validation" if trained_on_test else "synthetic:test"]
    return []


def validation_benchmarks(data_benchmarks: list[str], requested: str, remeasured: list[str]) -> list[str]:
    """`--eval-benchmarks` when given; for synthetic training data the first synthetic split that is neither trained
    on nor used by the re-measure (validation, as a rule: choosing a checkpoint on the test split would flatter
    it); otherwise none."""
    chosen = [b.strip() for b in requested.split(",") if b.strip()]
    if chosen:
        return chosen
    if not data_benchmarks or not all(b.split(":")[0] == "synthetic" for b in data_benchmarks):
        return []
    taken = {_synthetic_split(b) for b in [*data_benchmarks, *remeasured] if b.split(":")[0] == "synthetic"}
    free = [s for s in ("validation", "train", "test") if s not in taken]
    return [f"synthetic:{free[0]}"] if free else []


def _synthetic_split(name: str) -> str:
    return name.partition(":")[2] or "test"
