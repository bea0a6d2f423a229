"""Where a `vopd distill` step spends its time, and how much memory the loss needs.

1. Step-time breakdown on the toy with its tuned settings: rollout, teacher forward, student forward + backward
   (loss included), and everything else (rendering, preprocessing, optimizer, teacher update, logging).
   Target: everything else ≤ 20% of the step.
2. Peak memory of the loss (forward + backward) at a Qwen3.5-sized vocabulary (248,320) and 4,096 response
   tokens: vopd's chunked path (vocabulary projection `--loss-chunk-size` rows at a time, recomputed in the
   backward) against a plain implementation that projects all tokens at once for student and teacher and then
   applies the same top-k + tail divergence. Measured on the CPU as the growth of the process's peak resident
   memory (VmHWM), each variant in a fresh subprocess, with a small hidden size (the head's weight is then small; the
   logits are what grows with the vocabulary). The plain variant is measured at fewer tokens where it would not
   fit, and its 4,096-token figure is extrapolated linearly (its memory is linear in the token count).

    .venv/bin/python benchmarks/distill_step.py [--model toy] [--steps 12] [--warmup 3] [--memory-only] [--like-toy]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 248_320
TOKENS = 4096
HIDDEN = 64

MEMORY_CHILD = r"""
import json, sys, torch
from vopd_train.losses import chunked_divergence, distill_divergence

def peak_kib():
    # VmHWM belongs to this process's own address space; ru_maxrss would start from the parent's peak
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

kind, n, vocab, hidden, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
head = torch.nn.Linear(hidden, vocab, bias=False)
t_head = torch.nn.Linear(hidden, vocab, bias=False)
hs = torch.randn(n, hidden, generator=g, requires_grad=True)
ht = torch.randn(n, hidden, generator=g)
ids = torch.randint(0, vocab, (n,), generator=g)
base = peak_kib()
if kind == "chunked":
    loss = chunked_divergence(hs, ht, head, t_head, ids, topk=100, chunk_size=chunk).loss
else:
    with torch.no_grad():
        zt = t_head(ht)
    loss = distill_divergence(head(hs), zt, topk=100)
loss.mean().backward()
peak = peak_kib()
print(json.dumps({"kind": kind, "tokens": n, "peak_growth_mib": (peak - base) / 1024}))
"""


def memory(kind: str, tokens: int, chunk: int) -> float:
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, kind, str(tokens), str(VOCAB), str(HIDDEN), str(chunk)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mib"]


def memory_report(chunk: int, plain_tokens: list[int]) -> None:
    print(f"\nloss peak memory, vocabulary {VOCAB:,}, hidden {HIDDEN}, forward + backward (CPU, peak RSS growth)")
    c = memory("chunked", TOKENS, chunk)
    print(f"  chunked (chunk {chunk}) at {TOKENS} tokens : {c:9.0f} MiB")
    plain = [(n, memory("plain", n, chunk)) for n in plain_tokens]
    for n, m in plain:
        print(f"  plain (all logits)  at {n:>4} tokens : {m:9.0f} MiB   ({m / n * 1024:.0f} MiB per 1k tokens)")
    n, m = plain[-1]
    est = m * TOKENS / n
    print(f"  plain at {TOKENS} tokens, extrapolated  : {est:9.0f} MiB   → chunked uses {c / est:.1%} of it")
    print(f"  (one float32 [{TOKENS} × {VOCAB}] tensor is {TOKENS * VOCAB * 4 / 2**20:.0f} MiB)")


def step_report(model: str, steps: int, warmup: int, like_toy: bool) -> None:
    import torch

    from vopd_train.config import TOY_PRESET, resolve
    from vopd_train.trainer import Distiller

    with tempfile.TemporaryDirectory() as out:
        overrides = dict(TOY_PRESET) if like_toy else {}
        overrides.update({"data": "synthetic:train", "out": out, "steps": warmup + steps, "remeasure": False,
                          "quiet": True, "save_every": 10**6})
        cfg, preset = resolve(model, overrides)
        d = Distiller(cfg, preset=preset)
        rows = []
        for s in range(warmup + steps):
            st = d.train_step(s)
            if s >= warmup:
                rows.append(st)
    parts = {k: sum(getattr(r, k) for r in rows) / len(rows) for k in ("t_rollout", "t_teacher", "t_student", "t_other")}
    total = sum(parts.values())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} (other processes share the CPU)")
    print(f"model {model}: batch {cfg.batch_size} prompts × {cfg.n_rollouts} rollouts, teacher {cfg.teacher}, "
          f"{'LoRA' if cfg.lora else 'full fine-tuning'}, "
          f"mean of {steps} steps after {warmup} warm-up steps")
    names = {"t_rollout": "rollout", "t_teacher": "teacher forward", "t_student": "student forward+backward",
             "t_other": "everything else"}
    for k, v in parts.items():
        print(f"  {names[k]:<26} {v:6.3f} s  {v / total:6.1%}")
    print(f"  {'step':<26} {total:6.3f} s   (target: everything else ≤ 20%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--plain-tokens", default="256,512", help="token counts at which the plain variant is measured")
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--like-toy", action="store_true", help="apply the toy's tuned settings to another model")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if not args.memory_only:
        step_report(args.model, args.steps, args.warmup, args.like_toy)
    memory_report(args.chunk, [int(x) for x in args.plain_tokens.split(",")])
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
