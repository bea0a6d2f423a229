"""Rollouts that reuse the student's own prefill: each prompt runs through the student once per step, not twice.

A distill step samples the student on its prompts, then scores the samples with the student (with gradient).
Both start with the same computation: the prompts, image and text, through the same weights (nothing is updated
between the rollouts and the scoring). The plain step runs it twice, once without gradient inside `generate` and
once with gradient in the student's forward; on short rollouts that prefill is most of the sampling's cost.

Here the student's forward over the prompts runs first, with gradient, left padded, one token short of each
prompt's end (as `vopd_train.prefill` does for rollouts); its cache serves twice:

- detached, expanded to n rows per prompt, it is the prefill that `generate` continues from (the last prompt
  token is the first decoding step), so the rollouts are drawn exactly as on the plain path;
- attached, expanded the same way, it is the prefix the student's scoring forward runs against: each sequence
  feeds its last prompt token and its response, whose hidden states predict the response tokens. The gradient
  flows back through the cache into the prompts' activations, as in `vopd_train.prefix`.

It applies when nothing can make the two computations differ or the memory grow: a model type proven exact
(`REUSE_MODEL_TYPES`, tests/test_reuse.py), no active dropout (the rollouts run in eval mode), no gradient
checkpointing, a single process, and the step's prompts in one micro-batch (the prefill's activations are
then the ones the student's forward keeps anyway). Elsewhere the step runs as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vopd_train.prefill import cache_keyword, output_cache, why_not_prefilled_once
from vopd_train.prefix import mrope_positions, scored_hidden, why_not_shared
from vopd_train.rollout import (
    EncodedPrompt,
    SeqBatch,
    _autocast,
    _config,
    backbone,
    model_family,
    unsupported,
)

# Model types whose reused prefill is proven exact against the plain step (tests/test_reuse.py): a key/value
# cache only (Qwen3.5's recurrent states are updated in place by `generate`, and are not reused here).
REUSE_MODEL_TYPES: frozenset[str] = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})


@dataclass
class StudentPrefill:
    """The student's forward over a step's prompts, one token short of each prompt's end, with gradient."""

    tokens: dict[str, Tensor]  # every per-token tensor of the full prompts, left padded [P, W]
    prompt_ids: list[Tensor]  # each prompt's own input_ids (to recognise the batch that is scored later)
    cache: Any  # the heads' cache, attached to the graph
    positions: Tensor  # the heads' M-RoPE positions [3, P, W - 1]
    deltas: Tensor  # each row's M-RoPE offset (last position + 1 − token count) [P, 1], for `generate`


class PrefillReuse:
    """Holds one step's student prefill between the rollouts (`prefill`) and the student's scoring (`hidden`)."""

    def __init__(self, model: Any, pad_id: int, max_prompts: int):
        self.model, self.pad_id, self.max_prompts = model, pad_id, max_prompts
        self.family = model_family(model)
        self.pending: StudentPrefill | None = None
        self._why_not_model = _why_not_model(model)

    def why_not(self, prompts: Sequence[EncodedPrompt], inputs: dict[str, Tensor]) -> str | None:
        """None when these prompts' rollouts can start from the student's prefill; otherwise why not."""
        if self._why_not_model is not None:
            return self._why_not_model
        if len(prompts) > self.max_prompts:
            return "the step's prompts span several micro-batches"
        if not torch.is_grad_enabled():
            return "gradients are off"
        return why_not_prefilled_once(getattr(_config(self.model), "model_type", None), inputs)

    def prefill(self, prompts: Sequence[EncodedPrompt], inputs: dict[str, Tensor]) -> StudentPrefill:
        """The student's forward over the prompts' heads (`inputs`: their left-padded generation inputs), kept
        for `hidden`; returns it for the rollouts."""
        keys = set(prompts[0].tokens)
        tokens = {k: v for k, v in inputs.items() if k in keys}
        vision = {k: v for k, v in inputs.items() if k not in keys}
        head = {k: v[:, :-1] for k, v in tokens.items()}
        base = backbone(self.model)
        try:
            positions, deltas = mrope_positions(base, head, vision, with_deltas=True)
            with _autocast(tokens["input_ids"].device):
                cache = output_cache(base(**head, **vision, position_ids=positions, use_cache=True))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise unsupported(self.family.name, "reuse the student's prefill", e) from e
        self.pending = StudentPrefill(tokens, [p.input_ids for p in prompts], cache, positions, deltas)
        return self.pending

    def hidden(self, batch: SeqBatch) -> Tensor | None:
        """The student's final hidden states `[N, H]` at `batch`'s response positions, through the pending
        prefill; None (and the prefill dropped) when `batch` is not this step's one micro-batch."""
        pre, self.pending = self.pending, None
        if pre is None or not _same_prompts(pre, batch):
            return None
        base = backbone(self.model)
        device = batch.input_ids.device
        lengths = batch.lengths.tolist()
        prompt_len = torch.tensor([len(ids) for ids in pre.prompt_ids], device=device)
        rows = torch.tensor(batch.seq_prompt, device=device)
        width = max(lengths)
        steps = torch.arange(width, device=device)
        # each sequence's last prompt token and its response but the last token (right padded past its end)
        at = (prompt_len[rows] - 1)[:, None] + steps
        fed = {key: torch.nn.functional.pad(t, (0, width)).gather(1, at) for key, t in batch.tokens.items()}
        fed_mask = fed.pop("attention_mask")
        fed_mask = fed_mask * (steps < batch.lengths[:, None]).to(fed_mask.dtype)
        cache = pre.cache
        if batch.seq_prompt != list(range(len(pre.prompt_ids))):
            cache.reorder_cache(rows)  # n rows per prompt: a differentiable gather, the prefix's grads add up
        mask = torch.cat([pre.tokens["attention_mask"][:, :-1][rows], fed_mask], 1)
        positions = pre.positions.amax(dim=2, keepdim=True)[:, rows] + 1 + steps
        try:
            with _autocast(device):
                h = base(**fed, attention_mask=mask, position_ids=positions, **{cache_keyword(base): cache},
                         use_cache=True).last_hidden_state
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise unsupported(self.family.name, "reuse the student's prefill", e) from e
        return torch.cat([h[k, :n] for k, n in enumerate(lengths)])


def reuse_for(engine: Any, model: Any, pad_id: int, cfg: Any, *, distributed: bool) -> PrefillReuse | None:
    """The trainer's prefill reuse, handed to its engine: for its own HF rollouts on the training model, with
    --prefix-sharing, in a single process (None elsewhere: the step runs as before)."""
    from vopd_train.rollout import HFRolloutEngine

    if not cfg.prefix_sharing or not isinstance(engine, HFRolloutEngine) or engine.model is not model:
        return None
    if distributed:
        from vopd_bench.modeling import say_once

        say_once("reuse:distributed", "under torchrun the rollouts and the student's forward each prefill the "
                 "prompts (the reused prefill is proven for one process only; slower, same result)")
        return None
    engine.reuse = PrefillReuse(model, pad_id, max_prompts=max(1, cfg.micro_batch_size // cfg.n_rollouts))
    return engine.reuse


def reused_or_scored(reuse: PrefillReuse | None, model: Any, batch: SeqBatch, share: bool) -> Tensor:
    """The student's hidden states at `batch`'s response positions: through this step's reused prefill where
    there is one, else `vopd_train.prefix.scored_hidden`."""
    hidden = reuse.hidden(batch) if reuse is not None else None
    return hidden if hidden is not None else scored_hidden(model, batch, share)


def _same_prompts(pre: StudentPrefill, batch: SeqBatch) -> bool:
    """`batch` holds every prefilled prompt, in order (its sequences prompt-major), and nothing else."""
    owner = batch.seq_prompt
    if owner != sorted(owner) or set(owner) != set(range(len(pre.prompt_ids))):
        return False
    first = {}
    for k, p in enumerate(owner):
        first.setdefault(p, k)
    ids = batch.input_ids[list(first.values())].cpu()  # one transfer, however many prompts
    return all(torch.equal(ids[p, :len(want)], want.cpu())
               for p, want in enumerate(pre.prompt_ids))


def _why_not_model(model: Any) -> str | None:
    model_type = getattr(_config(model), "model_type", None)
    if model_type not in REUSE_MODEL_TYPES:
        return f"the student's prefill is reused for rollouts only for {', '.join(sorted(REUSE_MODEL_TYPES))}"
    reason = why_not_shared(model)
    if reason is not None:
        return reason
    from vopd_train import recompute

    if recompute.enabled(model):
        return "--gradient-checkpointing recomputes the layers (the reused prefill is proven without it)"
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return "the model has active dropout (rollouts run without it)"
    text = _config(model).get_text_config()
    if (getattr(text, "attention_dropout", 0.0) or 0.0) > 0:
        return "the model has attention dropout (rollouts run without it)"
    return None


__all__ = ["REUSE_MODEL_TYPES", "PrefillReuse", "StudentPrefill", "reuse_for", "reused_or_scored"]
