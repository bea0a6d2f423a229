"""Build the toy VLM: `python -m vopd_bench.toy.build --seed 0 --out vopd_bench/toy/model`.

Builds the tokenizer, processor and a random tiny Qwen2-VL offline, trains it with labels on `synthetic:train`
(crop views only by default), measures its greedy accuracy per view on `synthetic:test`, and saves everything
(safetensors, config, tokenizer, processor, and `toy_build.json` with the recipe and the measured accuracies).

The ceiling check is the same recipe with a share of full views: `--full-fraction 0.1 --out runs/toy-ceiling`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

from vopd_bench.benchmarks.synthetic import make_samples, synthetic_spec
from vopd_bench.tiny import build_tiny_vlm
from vopd_bench.toy import TOY_MODEL_CONFIG, TOY_WORLD, toy_corpus
from vopd_bench.toy.evaluate import accuracy_per_view
from vopd_bench.toy.train import Recipe, train

SLICE = 48  # the first samples of synthetic:test whose accuracies tests/test_toy.py re-measures
BUILD_INFO = "toy_build.json"


def build(out: Path, recipe: Recipe, threads: int = 1, eval_n: int | None = None, log=print) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cfg = TOY_MODEL_CONFIG

    model, processor = build_tiny_vlm(None, replace(cfg, seed=recipe.seed), corpus=toy_corpus())
    n_params = sum(p.numel() for p in model.parameters())
    log(f"toy: {n_params:,} parameters; recipe {recipe.as_dict()}")
    train_samples = make_samples("train", TOY_WORLD)
    losses = train(model, processor, train_samples, synthetic_spec("train", TOY_WORLD), recipe, TOY_WORLD.canvas,
                   cfg.image_pixels, log=log)
    train_s = time.perf_counter() - t0

    test_spec = synthetic_spec("test", TOY_WORLD)
    test = make_samples("test", TOY_WORLD, n=eval_n)
    t1 = time.perf_counter()
    acc_test = accuracy_per_view(model, processor, test, test_spec)
    acc_slice = accuracy_per_view(model, processor, test[:SLICE], test_spec)
    eval_s = time.perf_counter() - t1
    log(f"synthetic:test (n={len(test)}): " + "  ".join(f"{v} {a:.3f}" for v, a in acc_test.items()))
    log(f"first {SLICE}: " + "  ".join(f"{v} {a:.3f}" for v, a in acc_slice.items()))

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = {
        "command": f"python -m vopd_bench.toy.build --seed {recipe.seed} --out {out}"
                   + (f" --full-fraction {recipe.full_fraction}" if recipe.full_fraction else ""),
        "recipe": recipe.as_dict(),
        "model_config": asdict(cfg) | {"seed": recipe.seed},
        "world": asdict(TOY_WORLD),
        "parameters": n_params,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "accuracy_test": {"n": len(test), **acc_test},
        "accuracy_slice": {"n": len(test[:SLICE]), **acc_slice},
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {threads} torch threads, "
                   f"{os.cpu_count()} visible cores",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")
    log(f"saved to {out} (train {train_s:.0f}s, eval {eval_s:.0f}s)")
    return info


def main(argv: list[str] | None = None) -> None:
    d = Recipe()
    ap = argparse.ArgumentParser(description="Build and train the toy VLM on synthetic:train.")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed for initialisation and data order")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "model", help="output folder")
    ap.add_argument("--steps", type=int, default=d.steps, help="optimiser steps")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step")
    ap.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    ap.add_argument("--full-fraction", type=float, default=d.full_fraction,
                    help="share of full views in training (0 = crops only; 0.1 = the ceiling check)")
    # One thread: a model this small is dominated by per-op overhead, and on a shared 2-core machine two threads
    # measured 4-6x slower per step. The thread count changes float summation order, hence the exact weights.
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (weights are bit-identical for a given value; default 1)")
    ap.add_argument("--eval-n", type=int, default=None, help="evaluate on the first N test samples (default all)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recipe = Recipe(seed=a.seed, steps=a.steps, batch_size=a.batch_size, lr=a.lr, full_fraction=a.full_fraction)
    build(a.out, recipe, threads=a.threads, eval_n=a.eval_n)


if __name__ == "__main__":
    main()
