"""Shared-prefix scoring: each prompt's image and question run through the language model once, and its n
responses run against that prefix's cache.

A distill step scores n responses per prompt, with the teacher (no gradient) and the student (with). The plain
path (`rollout.response_hidden`) runs the whole prompt once per response: 2·n·(P+R) tokens for P prefix and R
response tokens. Here the prefix runs once per prompt with `use_cache`, its cache is expanded n-fold by index
(`reorder_cache` with index 0 repeated: a differentiable gather), and the n right-padded responses run against
it: 2·(P + n·R) tokens. The expansion lives inside the autograd graph, so the prefix's activations receive the
summed gradient of all n responses, exactly as the sum of n separate forwards would give them.

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
from vopd_train.prefill import SHARED_MODEL_TYPES
from vopd_train.rollout import SeqBatch, _autocast, _config, backbone, response_hidden, unsupported


def why_not_shared(model: Any) -> str | None:
    """None when `model` can share its prefixes; otherwise why not, in a phrase."""
    model_type = getattr(_config(model), "model_type", None)
    if model_type not in SHARED_MODEL_TYPES:
        return (f"prefix sharing is proven only for {', '.join(sorted(SHARED_MODEL_TYPES))}, not {model_type} "
                "(its positions or attention masks are not yet checked against the plain path)")
    if any(getattr(m, "gradient_checkpointing", False) is True for m in backbone(model).modules()):
        return "gradient checkpointing disables the cache that prefix sharing runs on"
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
    """`response_hidden` computed with one prefix forward per distinct prompt (see the module docstring)."""
    base = backbone(model)
    lengths = batch.lengths.tolist()
    starts = [0, *torch.cumsum(batch.lengths, 0).tolist()]
    per_seq: list[Tensor | None] = [None] * len(lengths)
    for i, vision in enumerate(batch.prompt_vision):
        seqs = [k for k, p in enumerate(batch.seq_prompt) if p == i]
        if not seqs:
            continue
        prefix_len = int(batch.pos[starts[seqs[0]]]) + 1  # the first response token is predicted by the prefix's last
        try:
            hidden = _prompt_hidden(base, batch, vision, seqs, prefix_len, [lengths[k] for k in seqs])
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise unsupported(getattr(_config(model), "model_type", type(model).__name__), "share prompt prefixes",
                              e) from e
        for k, h in zip(seqs, hidden, strict=True):
            per_seq[k] = h
    return torch.cat([h for h in per_seq if h is not None])


def _prompt_hidden(base: Any, batch: SeqBatch, vision: dict[str, Tensor], seqs: list[int], prefix_len: int,
                   lengths: list[int]) -> list[Tensor]:
    """One prompt: its prefix once, then its responses `seqs` against the expanded cache. Returns, per response,
    the hidden states that predict its tokens."""
    n, width = len(seqs), max(lengths)
    first = seqs[0]
    prefix = {key: t[first:first + 1, :prefix_len] for key, t in batch.tokens.items()}
    positions = mrope_positions(base, prefix, vision)
    with _autocast(batch.input_ids.device):
        out = base(**prefix, **vision, position_ids=positions, use_cache=True)
        cache = out.cache
        cache.reorder_cache(torch.zeros(n, dtype=torch.long, device=positions.device))
        _out_of_place_states(cache)
        rows = torch.tensor(seqs, device=positions.device)
        resp = {key: t[rows, prefix_len:prefix_len + width] for key, t in batch.tokens.items()}
        resp_mask = resp.pop("attention_mask")
        mask = torch.cat([resp_mask.new_ones(n, prefix_len), resp_mask], 1)
        steps = torch.arange(width, device=positions.device)
        resp_pos = (positions.amax(dim=(1, 2), keepdim=True) + 1 + steps).expand(-1, n, -1)
        h = base(**resp, attention_mask=mask, position_ids=resp_pos, cache=cache, use_cache=True).last_hidden_state
    last = out.last_hidden_state[0, -1:]
    return [torch.cat([last, h[j, :length - 1]]) for j, length in enumerate(lengths)]


def mrope_positions(base: Any, prefix: dict[str, Tensor], vision: dict[str, Tensor]) -> Tensor:
    """The prefix's M-RoPE positions `[3, 1, P]` from the model's own rule (image grid → 3-D positions)."""
    positions, _ = base.get_rope_index(prefix["input_ids"], mm_token_type_ids=prefix["mm_token_type_ids"],
                                       image_grid_thw=vision.get("image_grid_thw"),
                                       attention_mask=prefix.get("attention_mask"))
    return positions


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
