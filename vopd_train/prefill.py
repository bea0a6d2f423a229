"""Rollouts that prefill each prompt once: n samples of a prompt decode from one copy of its prefix.

Sampling n rollouts per prompt with transformers `generate` the plain way repeats every prompt n times, so the
language model prefills (and the vision tower encodes) each prompt n times. Here the prompts run once, batched
and left padded, through the model's backbone with a cache; the cache is expanded n-fold by index
(`reorder_cache`, which also carries Qwen3.5's conv and recurrent states, where `batch_repeat_interleave` would
repeat only keys and values); and `generate` continues the n·P rows from there. Only the prefill changes:
`generate` does the sampling, the banned ids, the stopping and the multi-GPU sync exactly as on the plain path,
so with per-row seeds (`vopd_train.sampling`) both paths draw the same tokens.

The prefill stops one token short of each prompt's end: `generate` needs the logits at the prompt's last token,
and it gets them by running that token (one per row) against the expanded cache. That token is text (the chat
template ends with the assistant header), so the cached part holds every image token.

Positions: Qwen's M-RoPE gives image tokens 3-D positions and text after them continues from the largest so far;
the backbone's forward keeps, per row, the offset between that position and the token count (`rope_deltas`),
and `generate` reads it to place every later token. The offset is expanded n-fold with the cache.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

# Model types whose shared prefix is proven exact against the plain path: for scoring (tests/test_prefix_sharing.py)
# and for rollouts (tests/test_rollout_prefill.py).
SHARED_MODEL_TYPES: frozenset[str] = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"})


def output_cache(out: Any) -> Any:
    """The cache a forward with `use_cache=True` returned: `out.cache` from transformers 5.24 on, where the key
    and value cache was renamed; `out.past_key_values` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_keyword(module: Any) -> str:
    """The keyword `module`'s forward (and `generate`) takes a cache by: `cache` from transformers 5.24 on
    (`past_key_values` still accepted there, with a deprecation warning), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def why_not_prefilled_once(model_type: str | None, inputs: Mapping[str, Tensor]) -> str | None:
    """None when these left-padded generation inputs can be prefilled once per prompt; otherwise why not."""
    if model_type not in SHARED_MODEL_TYPES:
        return (f"rollouts share a prompt's prefill only for {', '.join(sorted(SHARED_MODEL_TYPES))}, not "
                f"{model_type} (its cache and positions are not yet checked against the plain path)")
    mm = inputs.get("mm_token_type_ids")
    if mm is None or not bool(mm.any(dim=1).all()):
        return "a prompt has no image (M-RoPE offsets are kept only for prompts with one)"
    if bool(mm[:, -1].any()):
        return "a prompt does not end with a text token, so its image cannot sit wholly in the shared prefill"
    return None


def generate_from_shared_prefill(model: Any, base: Any, inputs: Mapping[str, Tensor], token_keys: set[str], n: int,
                                 **generate_kwargs: Any) -> Tensor:
    """`model.generate` over every prompt of `inputs` (P left-padded rows with their vision tensors) repeated n
    times, prompt-major, with each prompt prefilled once. `base` is the model's backbone (the module that keeps
    `rope_deltas`); `token_keys` names the per-token tensors. Returns what `generate` returns: [n·P, W + new]."""
    tokens = {k: v for k, v in inputs.items() if k in token_keys}
    vision = {k: v for k, v in inputs.items() if k not in token_keys}
    head = {k: v[:, :-1] for k, v in tokens.items()}
    base.rope_deltas = None  # a stale offset from an earlier batch must not place this prefill's tokens
    cache = output_cache(base(**head, **vision, use_cache=True))
    return continue_from_prefill(model, base, tokens, cache, base.rope_deltas, n, **generate_kwargs)


def continue_from_prefill(model: Any, base: Any, tokens: Mapping[str, Tensor], cache: Any, deltas: Tensor, n: int,
                          **generate_kwargs: Any) -> Tensor:
    """`model.generate` over the prompts `tokens` (P left-padded rows, every per-token tensor) repeated n times,
    prompt-major, from `cache`: their prefill one token short of the end, with the M-RoPE offsets `deltas`."""
    rows = torch.arange(len(tokens["input_ids"]), device=tokens["input_ids"].device).repeat_interleave(n)
    cache.reorder_cache(rows)
    base.rope_deltas = deltas[rows]
    expanded = {k: v[rows] for k, v in tokens.items()}
    return model.generate(**expanded, **{cache_keyword(model): cache}, **generate_kwargs)


def detached_cache(cache: Any) -> Any:
    """A copy of a key/value cache whose tensors are cut from the autograd graph. They share storage with the
    original: `generate` only extends and re-indexes them into new tensors, so the original is left as it was."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        twin = copy.copy(layer)
        if getattr(layer, "keys", None) is not None:
            twin.keys, twin.values = layer.keys.detach(), layer.values.detach()
        out.layers.append(twin)
    return out
