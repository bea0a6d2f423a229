"""How much time gap-report spends outside the backend.

Runs one gap report with a backend loaded beforehand (model loading is not the harness's cost) and prints
wall time / time inside `backend.generate`, both for the ask-and-record loop alone and end to end with the
analysis, plots and report. Target: end to end ≤ 1.10.

    .venv/bin/python benchmarks/harness_overhead.py [--model toy] [--limit N] [--benchmarks synthetic]
    .venv/bin/python benchmarks/harness_overhead.py --random-width 512 --limit 100

The toy answers in ~6 ms a request, so it is the worst case for this ratio: fixed costs (report writing, first
imports) weigh most against it. `--random-width W` instead builds a random Qwen2-VL of text width W (4 layers)
to show the ratio for a model whose answers cost more.
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
    ap.add_argument("--random-width", type=int, default=0, help="use a random Qwen2-VL of this text width")
    args = ap.parse_args()

    import torch

    from vopd_bench.backends import get_backend
    from vopd_bench.runner import GapReportConfig, run_gap_report

    scratch = tempfile.TemporaryDirectory()
    if args.random_width:
        from vopd_bench.tiny import TinyVLMConfig, build_tiny_vlm

        cfg = TinyVLMConfig(text_hidden=args.random_width, text_layers=4, text_heads=8, text_kv_heads=4,
                            vision_dim=args.random_width // 2, vision_layers=4)
        args.model = f"{scratch.name}/random-{args.random_width}"
        build_tiny_vlm(args.model, cfg)
    backend = get_backend("hf", args.model, batch_size=args.batch_size)
    n_params = sum(p.numel() for p in backend.model.parameters())
    with tempfile.TemporaryDirectory() as out:
        cfg = GapReportConfig(model=args.model, benchmarks=args.benchmarks.split(","), limit=args.limit, out=out,
                              quiet=True, batch_size=args.batch_size)
        t0 = time.perf_counter()
        result = run_gap_report(cfg, backend=backend)
        wall = time.perf_counter() - t0
    t = result.timings
    n = len(result.records)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print(f"model {args.model} ({n_params / 1e6:.1f}M parameters), benchmarks {args.benchmarks}, {n} requests, "
          f"batch {args.batch_size}")
    print(f"inside backend.generate : {t.backend_seconds:8.2f} s")
    print(f"ask-and-record loop     : {t.ask_seconds:8.2f} s   ratio {t.ask_seconds / t.backend_seconds:.3f}")
    print(f"end to end (with report): {wall:8.2f} s   ratio {wall / t.backend_seconds:.3f}   (target ≤ 1.10)")
    scratch.cleanup()


if __name__ == "__main__":
    main()
