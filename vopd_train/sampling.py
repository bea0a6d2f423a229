"""Sampling that depends on the prompt, not on the batch it happens to be in.

Rollout j of prompt i at step s draws its tokens from its own stream of random numbers, so a step samples the
same tokens whether its prompts are split over 1, 2 or 8 ranks, and whatever else shares their batch.

For transformers `generate` this is Gumbel-max sampling: token t of a row is argmax(z/T + g), with g standard
Gumbel noise, which draws exactly from softmax(z/T). The noise is counter-based: each value is a hash of (the
row's seed, t, the token id), with no generator state, so it is the same on any device and in any batch. vLLM
takes the prompt's seed per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
SEED_BITS = 31  # vLLM and most samplers take a non-negative 32-bit seed


def _splitmix(x: int) -> int:
    """The splitmix64 finaliser on a Python int (64-bit unsigned)."""
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*parts: int) -> int:
    """One seed from several integers (a hash chain), in [0, 2**31)."""
    h = 0
    for p in parts:
        h = _splitmix(h ^ (p & _MASK64))
    return h & ((1 << SEED_BITS) - 1)


def prompt_seed(seed: int, step: int, prompt_index: int) -> int:
    """The seed of prompt `prompt_index` (its index in the data set) at step `step` of a run seeded `seed`."""
    return mix_seed(seed, step, prompt_index)


def row_seed(prompt: int, rollout: int) -> int:
    """The seed of rollout `rollout` of a prompt whose seed is `prompt`."""
    return mix_seed(prompt, rollout)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch shifts int64 arithmetically)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def uniform_noise(seeds: Tensor, position: int, vocab: int) -> Tensor:
    """U(0, 1) noise `[B, vocab]` (float64): entry (b, v) hashes (seeds[b], position, v) with splitmix64.

    int64 arithmetic wraps around on overflow, which is what a 64-bit hash needs.
    """
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    counter = ids + (position * vocab + 1)
    z = seeds.to(torch.int64)[:, None] * _signed(_MIX2) + counter[None, :] * _signed(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).to(torch.float64) + 0.5) / float(1 << 24)  # 24 bits, never 0 or 1


def gumbel_noise(seeds: Tensor, position: int, vocab: int) -> Tensor:
    return -torch.log(-torch.log(uniform_noise(seeds, position, vocab)))


class GumbelMaxSampler:
    """A transformers logits processor for greedy `generate` that turns it into per-row seeded sampling.

    Row b's scores become z/T + g(seed_b, t), where t counts the tokens generated so far; greedy decoding then
    picks argmax, a draw from softmax(z/T). Masked scores (−inf, e.g. banned ids) stay masked.
    """

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.seeds = torch.tensor(list(seeds), dtype=torch.int64)
        self.temperature = temperature
        self.start: int | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        if input_ids.shape[0] != len(self.seeds):
            raise ValueError(f"{len(self.seeds)} row seeds for a batch of {input_ids.shape[0]} rows")
        g = gumbel_noise(self.seeds.to(scores.device), input_ids.shape[1] - self.start, scores.shape[-1])
        return (scores.double() / self.temperature + g).to(scores.dtype)


def generate_options(prompt_seeds: Sequence[int] | None, n: int, temperature: float) -> dict[str, Any]:
    """The sampling keyword arguments of `generate` for rows laid out prompt-major (n rows per prompt).

    With `prompt_seeds`, per-row Gumbel-max sampling; without, transformers' own sampler (batch-dependent).
    Under torchrun every rank keeps stepping until all are done, as FSDP's collectives need (`synced_gpus`).
    """
    from transformers import LogitsProcessorList

    from vopd_bench import distributed

    opts: dict[str, Any] = {"synced_gpus": distributed.active()}
    if prompt_seeds is None:
        return {**opts, "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    seeds = [row_seed(s, j) for s in prompt_seeds for j in range(n)]
    return {**opts, "do_sample": False, "temperature": None, "top_k": None, "top_p": None,
            "logits_processor": LogitsProcessorList([GumbelMaxSampler(seeds, temperature)])}
