"""Shared-prefix scoring: each prompt's image and question run through the language model once, and its n
responses run against that prefix's cache.

A distill step scores n responses per prompt, with the teacher (no gradient) and the student (with). The plain
path (`rollout.response_hidden`) runs the whole prompt once per response: 2·n·(P+R) tokens for P prefix and R
response tokens. Here the micro-batch's prompts run once, in one forward, left padded, with `use_cache`; the
cache is expanded to one row per response by index (`reorder_cache`: a differentiable gather), and all the
right-padded responses run against it in a second forward: 2·(P + n·R) tokens. The expansion lives inside the
autograd graph, so each prefix's activations receive the summed gradient of its n responses, exactly as the sum
of n separate forwards would give them. Left padding changes no value: padded keys are masked out, and Qwen3.5's
linear-attention layers zero padded inputs, which leaves their conv window and recurrent state at zero.

Positions: M-RoPE (Qwen families) gives image tokens 3-D positions; text after the image continues from the
largest position so far. The prefix gets its positions from the model's own `get_rope_index` and the response
tokens continue from max + 1 on all three axes (the rope delta), both passed explicitly so no `rope_deltas` left
on the model by an earlier `generate` is ever read.

Qwen3.5's linear-attention layers carry a conv window and a recurrent state instead of keys and values: the
state after the prefix is what is shared. transformers updates those states in place after every forward, which
would overwrite a tensor the backward pass still needs; the response forward never needs the updated states, so
its cache keeps them out of place (`_out_of_place_states`).

Only model types whose exactness is proven by `tests/test_prefix_sharing.py` share (`SHARED_MODEL_TYPES`);
any other falls back to the plain path and says so once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vopd_bench.modeling import say_once
from vopd_train import recompute
from vopd_train.prefill import SHARED_MODEL_TYPES, cache_keyword, output_cache
from vopd_train.rollout import (
    SeqBatch,
    _autocast,
    _config,
    backbone,
    collate_vision,
    response_hidden,
    unsupported,
)


def why_not_shared(model: Any) -> str | None:
    """None when `model` can share its prefixes; otherwise why not, in a phrase."""
    model_type = getattr(_config(model), "model_type", None)
    if model_type not in SHARED_MODEL_TYPES:
        return (f"prefix sharing is proven only for {', '.join(sorted(SHARED_MODEL_TYPES))}, not {model_type} "
                "(its positions or attention masks are not yet checked against the plain path)")
    if any(getattr(m, "gradient_checkpointing", False) is True for m in backbone(model).modules()):
        return "gradient checkpointing disables the cache that prefix sharing runs on"
    if recompute.enabled(model):
        return recompute.why_not_replayable(model)
    return None


def scored_hidden(model: Any, batch: SeqBatch, share: bool) -> Tensor:
    """Final hidden states `[N, H]` at the positions that predict `batch`'s response tokens, in `batch.rows`
    order: through the shared prefix where `share` and the model allow it, else the plain path (said once)."""
    # with one response per prompt there is nothing to share, and the plain path batches all prompts in one forward
    if share and len(set(batch.seq_prompt)) < len(batch.seq_prompt):
        reason = why_not_shared(model)
        if reason is None:
            return shared_prefix_hidden(model, batch)
        say_once(f"prefix-sharing:{reason}", f"{reason}: each response runs with its own copy of the prompt "
                 "(slower, same result)")
    return response_hidden(model, batch)


def shared_prefix_hidden(model: Any, batch: SeqBatch) -> Tensor:
    """`response_hidden` computed with one prefix forward for all the batch's prompts, left padded, and one
    forward of all its responses against the expanded cache (see the module docstring)."""
    base = backbone(model)
    try:
        return _batched_hidden(base, batch)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise unsupported(getattr(_config(model), "model_type", type(model).__name__), "share prompt prefixes",
                          e) from e


def _batched_hidden(base: Any, batch: SeqBatch) -> Tensor:
    device = batch.input_ids.device
    lengths = batch.lengths.tolist()
    starts = [0, *torch.cumsum(batch.lengths, 0).tolist()[:-1]]
    owner = batch.seq_prompt
    first = {}  # prompt → its first sequence, whose first tokens are the prompt
    for k, p in enumerate(owner):
        first.setdefault(p, k)
    prompts = sorted(first)  # every prompt of the batch has a sequence (build_sequences keeps only those used)
    # the first response token is predicted by the prefix's last token
    prefix_len = [int(batch.pos[starts[first[p]]]) + 1 for p in prompts]
    width = max(prefix_len)
    prefix = {}
    for key, t in batch.tokens.items():  # left padded: every row's prefix ends in the last column
        padded = t.new_full((len(prompts), width), 0)
        for i, p in enumerate(prompts):
            padded[i, width - prefix_len[i]:] = t[first[p], :prefix_len[i]]
        prefix[key] = padded
    vision = collate_vision([batch.prompt_vision[p] for p in prompts], batch.family)
    positions = mrope_positions(base, prefix, vision)
    with _autocast(device):
        out = base(**prefix, **vision, position_ids=positions, use_cache=True)
        cache = output_cache(out)
        row_of = {p: i for i, p in enumerate(prompts)}
        rows = torch.tensor([row_of[p] for p in owner], device=device)
        cache.reorder_cache(rows)
        _out_of_place_states(cache)
        resp_width = max(lengths)
        at = torch.tensor([prefix_len[row_of[p]] for p in owner], device=device)[:, None] + torch.arange(
            resp_width, device=device)  # where each response's tokens sit in its sequence (right-padded past the end)
        resp = {key: torch.nn.functional.pad(t, (0, resp_width)).gather(1, at) for key, t in batch.tokens.items()}
        resp_mask = resp.pop("attention_mask")
        mask = torch.cat([prefix["attention_mask"][rows], resp_mask], 1)
        steps = torch.arange(resp_width, device=device)
        resp_pos = positions.amax(dim=2, keepdim=True)[:, rows] + 1 + steps
        h = base(**resp, attention_mask=mask, position_ids=resp_pos, use_cache=True,
                 **{cache_keyword(base): cache}).last_hidden_state
    last = out.last_hidden_state[:, -1]
    return torch.cat([torch.cat([last[row_of[p]][None], h[k, :lengths[k] - 1]]) for k, p in enumerate(owner)])


def mrope_positions(base: Any, prefix: dict[str, Tensor], vision: dict[str, Tensor], with_deltas: bool = False) -> Any:
    """The prefixes' M-RoPE positions `[3, P, W]` from the model's own rule (image grid → 3-D positions), with
    left padding masked out; with `with_deltas`, also each row's offset `[P, 1]` as the model keeps it for
    `generate` (last position + 1 − token count)."""
    positions, deltas = base.get_rope_index(prefix["input_ids"], mm_token_type_ids=prefix["mm_token_type_ids"],
                                            image_grid_thw=vision.get("image_grid_thw"),
                                            attention_mask=prefix.get("attention_mask"))
    return (positions, deltas) if with_deltas else positions


def _out_of_place_states(cache: Any) -> None:
    """Linear-attention layers (Qwen3.5) write their conv window and recurrent state back in place with `copy_`,
    over the very tensors the response forward read (autograd would refuse the backward). Assign instead: the
    conv window through the layer's own past-recording mode, the recurrent state by returning it unstored."""
    for layer in getattr(cache, "layers", ()):
        if hasattr(layer, "recurrent_states"):
            layer.record_past = True
            layer.update_recurrent_state = _unstored


def _unstored(recurrent_states: Tensor, state_idx: int = 0, **kwargs: Any) -> Tensor:
    return recurrent_states
