"""The toy's labelled training recipe: cross-entropy on the answer letter and `<|im_end|>`, mostly on crop views."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from vopd_bench.benchmarks.spec import BenchmarkSpec
from vopd_bench.samples import Sample
from vopd_bench.toy.data import batch_plan, encode_with_answers, view_example


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    steps: int = 700
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 40
    weight_decay: float = 0.01
    full_fraction: float = 0.0  # share of full views; the rest are crops. The ceiling check uses 0.1.
    grad_clip: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(model, processor, samples: Sequence[Sample], spec: BenchmarkSpec, recipe: Recipe, canvas: int,
          image_pixels: int, log: Callable[[str], None] = print, log_every: int = 50,
          monitor: Callable[[int], str] | None = None) -> list[float]:
    """Train `model` in place; returns the loss per step. Deterministic for a given recipe and thread count."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(recipe.seed)
    plan = batch_plan(samples, recipe.steps, recipe.batch_size, recipe.full_fraction, recipe.seed, canvas,
                      image_pixels)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, recipe.warmup, recipe.steps))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step, batch in enumerate(plan):
        examples = [view_example(samples[i], view, spec) for i, view in batch]
        inputs, targets = encode_with_answers(processor, examples)
        # Only the last two positions are scored: they predict the letter and the end of the turn.
        logits = model(**inputs, use_cache=False, logits_to_keep=2).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == len(plan):
            recent = losses[-log_every:]
            log(f"step {step + 1}/{len(plan)}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - start:.0f}s"
                + (f"  {monitor(step + 1)}" if monitor else ""))
    model.eval()
    return losses
