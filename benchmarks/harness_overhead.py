"""How much time gap-report spends outside the backend.

Runs one gap report with a backend loaded beforehand (model loading is not the harness's cost) and prints
wall time / time inside `backend.generate`, both for the ask-and-record loop alone and end to end with the
analysis, plots and report. Target: end to end ≤ 1.10.

    .venv/bin/python benchmarks/harness_overhead.py [--model toy] [--limit N] [--benchmarks synthetic]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--benchmarks", default="synthetic")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import torch

    from vopd_bench.backends import get_backend
    from vopd_bench.runner import GapReportConfig, run_gap_report

    backend = get_backend("hf", args.model, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as out:
        cfg = GapReportConfig(model=args.model, benchmarks=args.benchmarks.split(","), limit=args.limit, out=out,
                              quiet=True, batch_size=args.batch_size)
        t0 = time.perf_counter()
        result = run_gap_report(cfg, backend=backend)
        wall = time.perf_counter() - t0
    t = result.timings
    n = len(result.records)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"model {args.model}, benchmarks {args.benchmarks}, {n} requests, batch {args.batch_size}")
    print(f"inside backend.generate : {t['backend_seconds']:8.2f} s")
    print(f"ask-and-record loop     : {t['run_seconds']:8.2f} s   ratio {t['run_seconds'] / t['backend_seconds']:.3f}")
    print(f"end to end (with report): {wall:8.2f} s   ratio {wall / t['backend_seconds']:.3f}   (target ≤ 1.10)")


if __name__ == "__main__":
    main()
