"""The colocated vLLM path on one GPU, with sleep mode: distill steps whose rollouts come from a vLLM engine in
the training process, the weights streamed into it after every update, the engine asleep while the trainer works.
Part of benchmarks/vllm_gpu_check.sh (NOT RUN YET: no GPU has been lent to this project).

    python benchmarks/vllm_colocate_check.py MODEL_DIR OUT_DIR [--steps 8] [--bucket-mb 64]

Asserts, per step: the importance weight (vLLM's log-probs as π_rollout, both sides in bfloat16) within
[0.98, 1.02]; after every sync, vLLM's greedy answers equal transformers' on the trainer's weights (allowing a
near-tie in bfloat16 on at most two of the eight probe prompts). Prints the GPU memory per phase: the device's used
memory (what `nvidia-smi` shows, vLLM's pool included) at the end of each phase and torch's peak allocation in
it, next to `vopd check --plan`'s figures when that command exists.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "real_vllm"))

from engine_checks import hf_greedy, vllm_greedy  # noqa: E402

from vopd_train.config import DistillConfig  # noqa: E402
from vopd_train.rollout_vllm import SLEEP_LEVEL, SLEEP_TAGS  # noqa: E402
from vopd_train.trainer import Distiller  # noqa: E402

GIB = 2**30


def used_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / GIB


class Phases:
    """Device memory at the end of each phase and torch's peak within it."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def end(self, step: int, phase: str) -> None:
        torch.cuda.synchronize()
        self.rows.append({"step": step, "phase": phase, "device_used_gib": round(used_gib(), 2),
                          "torch_peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--bucket-mb", type=float, default=64)
    ap.add_argument("--memory-share", type=float, default=0.3)
    args = ap.parse_args()
    cfg = DistillConfig(model=args.model, data="synthetic:train", out=args.out, steps=args.steps, batch_size=8,
                        n_rollouts=4, max_new_tokens=32, micro_batch_size=16, lr=1e-4, warmup_steps=0, topk=50,
                        seed=0, importance_weight=True, rollout_engine="vllm", vllm_sleep_mode=True,
                        vllm_gpu_memory_utilization=args.memory_share, sync_bucket_mb=args.bucket_mb,
                        remeasure=False, quiet=True, restart=True)
    phases = Phases()
    t0 = time.perf_counter()
    phases.start()
    d = Distiller(cfg)
    phases.end(0, "set-up (model, teacher, optimizer, engine started)")
    generate, sync = d.engine.generate, d.engine.sync_weights
    step = {"k": 0}

    def timed_generate(prompts, settings):
        phases.end(step["k"], "training (before the rollouts)")
        phases.start()
        out = generate(prompts, settings)
        phases.end(step["k"], "rollout (engine awake, then asleep)")
        phases.start()
        return out

    def timed_sync(model):
        phases.end(step["k"], "training (teacher, student, backward, step)")
        phases.start()
        sync(model)
        phases.end(step["k"], "weight sync (engine's weights awake)")
        phases.start()

    d.engine.generate, d.engine.sync_weights = timed_generate, timed_sync
    probes, _ = d._render(list(range(8)))
    weights, disagreements = [], []
    for k in range(args.steps):
        step["k"] = k + 1
        stats = d.train_step(k)
        d.step = k + 1
        weights.append(stats.is_weight)
        d.engine._wake(*SLEEP_TAGS)  # the probe needs the KV cache the rollouts' sleep freed
        engine_answers = vllm_greedy(d.engine, probes)
        d.engine.llm.sleep(level=SLEEP_LEVEL)  # back to the state the trainer leaves it in
        d.engine._asleep = set(SLEEP_TAGS)
        disagreements.append(sum(a != b for a, b in zip(engine_answers, hf_greedy(d.model, d.processor, d.engine,
                                                                                       probes), strict=True)))
        print(f"step {k + 1}: importance weight {stats.is_weight:.4f}, probe answers differing {disagreements[-1]}/8, "
              f"sync {d.engine.last_sync.buckets} buckets, {d.engine.last_sync.bytes / 2**20:.0f} MiB in "
              f"{d.engine.last_sync.seconds:.2f} s", flush=True)
    d.engine.close()
    print(f"{args.steps} steps in {time.perf_counter() - t0:.0f} s")
    print(f"{'step':>4}  {'phase':<52} {'device used GiB':>15} {'torch peak GiB':>14}")
    for r in phases.rows:
        print(f"{r['step']:>4}  {r['phase']:<52} {r['device_used_gib']:>15.2f} {r['torch_peak_gib']:>14.2f}")
    Path(args.out, "memory_phases.json").write_text(json.dumps(phases.rows, indent=1))
    plan = subprocess.run(["vopd", "check", args.model, "--plan", "--gpus", "1", "--gpu-memory",
                           f"{torch.cuda.mem_get_info()[1] / GIB:.0f}", "--rollout-engine", "vllm",
                           "--vllm-sleep-mode", "--n-rollouts", "4", "--batch-size", "8", "--max-new-tokens", "32"],
                          capture_output=True, text=True)
    print("vopd check --plan:", plan.stdout if plan.returncode == 0 else f"not available ({plan.stderr.strip()[-200:]})")
    assert all(0.98 <= w <= 1.02 for w in weights), weights
    assert max(disagreements) <= 2, disagreements


if __name__ == "__main__":
    main()
