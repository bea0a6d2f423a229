"""Which teacher? The paper's Table 3 on a CPU: the same toy budget distilled with a `current` (live student),
an `ema` and a `frozen` teacher, each re-measured on `synthetic:test`.

The paper reports that the current-policy teacher collapses (teacher and student co-adapt) while the
regularised ones do not. Every run uses the toy's tuned settings except the teacher (and `--steps`/`--lr` when
given); the starting model is measured once.

    .venv/bin/python benchmarks/teacher_ablation.py [--model toy] [--teachers current,ema,frozen]
        [--steps N] [--lr LR] [--eval-limit N] [--out runs/teacher_ablation]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METRICS = ("acc_full", "acc_crop", "gap", "mean_full_crop")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--teachers", default="current,ema,frozen")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's steps (same for every teacher)")
    ap.add_argument("--lr", type=float, default=None, help="override the preset's learning rate")
    ap.add_argument("--teacher-rate", type=float, default=None, help="EMA rate (default 0.05)")
    ap.add_argument("--eval-limit", type=int, default=None, help="samples of synthetic:test to re-measure on")
    ap.add_argument("--out", default="runs/teacher_ablation")
    args = ap.parse_args()

    import pandas as pd

    from vopd_bench.runner import GapReportConfig, run_gap_report
    from vopd_train.config import resolve
    from vopd_train.remeasure import before_after_table
    from vopd_train.trainer import Distiller

    out = Path(args.out)
    bench = ["synthetic:test"]
    t0 = time.perf_counter()
    threads = resolve(args.model, {"data": "synthetic:train", "out": str(out)})[0].threads
    if threads:
        import torch

        torch.set_num_threads(threads)  # the preset's count for the measurements too, not only the training
    before = run_gap_report(GapReportConfig(model=args.model, benchmarks=bench, limit=args.eval_limit,
                                            out=str(out / "before"), quiet=True))
    rows = []
    for teacher in args.teachers.split(","):
        overrides = {"data": "synthetic:train", "out": str(out / teacher), "teacher": teacher, "steps": args.steps,
                     "lr": args.lr, "teacher_rate": args.teacher_rate, "remeasure": False, "quiet": True}
        cfg, _ = resolve(args.model, overrides)
        t = time.perf_counter()
        result = Distiller(cfg).train()
        train_s = time.perf_counter() - t
        after = run_gap_report(GapReportConfig(model=str(result.model_dir), benchmarks=bench, limit=args.eval_limit,
                                               out=str(out / teacher / "after"), quiet=True))
        table = before_after_table(before.records, after.records)
        table = table[(table["category"] == "all") & table["metric"].isin(METRICS)]
        last = result.history[-1]
        parse_fail = sum(bool(r.parse_failed) for r in after.records) / max(len(after.records), 1)
        row = {"teacher": teacher, "steps": cfg.steps, "lr": cfg.lr, "train_s": round(train_s),
               "final_divergence": last["divergence"], "final_agree": last["agree"], "parse_fail": parse_fail}
        for r in table.to_dict("records"):
            row[f"{r['metric']}_before"] = r["before"]
            row[r["metric"]] = r["after"]
            row[f"{r['metric']}_ci"] = f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"
        rows.append(row)
        print(f"{teacher}: full {100 * row['acc_full']:.1f}  crop {100 * row['acc_crop']:.1f}  gap "
              f"{100 * row['gap']:.1f}  parse failures {100 * parse_fail:.1f}%  ({train_s:.0f} s)", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "teacher_ablation.csv", index=False)
    first = rows[0]
    print(f"\nstarting model: full {100 * first['acc_full_before']:.1f}  crop {100 * first['acc_crop_before']:.1f}  "
          f"gap {100 * first['gap_before']:.1f}   (synthetic:test, n={len(before.records) // 3})")
    print(f"{'teacher':<10}{'full':>8}{'crop':>8}{'gap':>8}{'mean':>8}{'parse fail':>12}{'agree':>8}{'train s':>9}")
    for r in rows:
        print(f"{r['teacher']:<10}{100 * r['acc_full']:8.1f}{100 * r['acc_crop']:8.1f}{100 * r['gap']:8.1f}"
              f"{100 * r['mean_full_crop']:8.1f}{100 * r['parse_fail']:11.1f}%{r['final_agree']:8.2f}{r['train_s']:9d}")
    print(f"\n{out / 'teacher_ablation.csv'}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
