"""The distillation divergence and its reductions: pure tensor functions, no model, no trainer.

Per response token t the student distribution p_S (full image) is pulled toward the teacher distribution p_T
(evidence crop, same text, same prefix). Both are reduced to the same buckets first:

- `topk=K` (default 100): the student's K most likely token ids, the teacher read at those same ids, plus one
  tail bucket holding the remaining mass, log(1 − Σ_K p). The tail is computed as a log-sum-exp over the logits
  outside the top-K, which stays exact when the top-K mass approaches 1 (no 1 − 0.9999999 cancellation).
- `add_tail=False`: the K buckets renormalised to sum to 1.
- `topk=None`: the full vocabulary.

The divergence between the two bucketed distributions (paper §2.2, reference_code §1.3):

    alpha = 0:  KL(T ‖ S)                      (forward KL, teacher as target)
    alpha = 1:  KL(S ‖ T)                      (reverse KL)
    otherwise:  alpha·KL(T ‖ M) + (1 − alpha)·KL(S ‖ M),   M = alpha·T + (1 − alpha)·S

alpha = 0.5 is the symmetric Jensen–Shannon divergence, bounded by log 2. Gradients reach the student through
p_S and through M; the teacher is a constant (detached here, whatever the caller passed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

# Log-probabilities are floored here before they meet each other: exp(-1e4) is exactly 0 in float32, so the
# floor changes no value, but it keeps zero-mass buckets (a tail of 0 when K covers the vocabulary) finite so
# that 0·(−inf) never turns into NaN in the forward or the backward pass.
LOG_FLOOR = -1e4
_MASKED = -1e30  # stands in for −inf where logits are masked out, for the same reason

Reduction = Literal["seq-mean", "token-mean"]


def bucket_log_probs(student_logits: Tensor, teacher_logits: Tensor, topk: int | None = 100,
                     add_tail: bool = True) -> tuple[Tensor, Tensor]:
    """Both distributions over the same buckets, as log-probabilities `[..., B]` in float32.

    B = V for `topk=None`, K + 1 with the tail, K without it. The teacher comes back detached.
    """
    s = student_logits.float()
    t = teacher_logits.detach().float()
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape")
    vocab = s.shape[-1]
    if topk is None:
        return F.log_softmax(s, -1).clamp(min=LOG_FLOOR), F.log_softmax(t, -1).clamp(min=LOG_FLOOR)
    if topk < 1:
        raise ValueError(f"topk must be ≥ 1 or None, got {topk}")
    k = min(topk, vocab)
    ids = torch.topk(s.detach(), k, dim=-1).indices  # the student's top-k; the teacher is read at the same ids
    s_k, t_k = s.gather(-1, ids), t.gather(-1, ids)
    if not add_tail:
        return F.log_softmax(s_k, -1), F.log_softmax(t_k, -1)
    s_lse, t_lse = torch.logsumexp(s, -1, keepdim=True), torch.logsumexp(t, -1, keepdim=True)
    # the tail: the log-sum-exp of the logits outside the top-k (the top-k masked out), not log(1 − Σp)
    s_tail = torch.logsumexp(s.scatter(-1, ids, _MASKED), -1, keepdim=True) - s_lse
    t_tail = torch.logsumexp(t.scatter(-1, ids, _MASKED), -1, keepdim=True) - t_lse
    log_s = torch.cat([s_k - s_lse, s_tail], -1).clamp(min=LOG_FLOOR)
    log_t = torch.cat([t_k - t_lse, t_tail], -1).clamp(min=LOG_FLOOR)
    return log_s, log_t


def bucket_divergence(log_s: Tensor, log_t: Tensor, alpha: float = 0.5) -> Tensor:
    """The generalised JSD between two bucketed distributions given as log-probabilities; sums the last dim."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    log_t = log_t.detach()
    if alpha == 0.0:
        return _kl(log_t, log_s)
    if alpha == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(alpha), log_s + math.log(1.0 - alpha)]), 0)
    return alpha * _kl(log_t, log_m) + (1.0 - alpha) * _kl(log_s, log_m)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def distill_divergence(student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.5, topk: int | None = 100,
                       add_tail: bool = True) -> Tensor:
    """Per-token divergence between the student and a stop-gradient teacher.

    Takes logits `[..., V]` and returns the loss `[...]` (float32). `alpha` weights the generalised JSD (0 =
    KL(T‖S), 1 = KL(S‖T), 0.5 = JSD). `topk` = the student's top-k ids plus a tail bucket (`add_tail=True`) or
    renormalised over the top-k (`add_tail=False`); `topk=None` = the full vocabulary. Only `student_logits`
    receives gradients.
    """
    log_s, log_t = bucket_log_probs(student_logits, teacher_logits, topk, add_tail)
    return bucket_divergence(log_s, log_t, alpha)


# The crop anchor is the forward KL(reference ‖ student): it is exactly 0 (not merely small) when the student's
# logits equal the reference's, so an anchor weight changes nothing until the crop view starts to move, and it
# covers all of the reference's mass, so no answer the starting model gives on the crop is squeezed out.
ANCHOR_ALPHA = 0.0


def anchor_divergence(student_logits: Tensor, reference_logits: Tensor, *, topk: int | None = 100,
                      add_tail: bool = True) -> Tensor:
    """The crop anchor per token: KL(reference ‖ student) between the student on the crop view and the frozen
    starting model on the same crop, same text, same response prefix (`--crop-anchor`).

    It keeps the view the student already reads well where it was while the full view is trained. The same
    buckets as `distill_divergence` (the student's top-k + tail, or the full vocabulary); only `student_logits`
    receives gradients. Exactly 0 where the two logits are equal.
    """
    return distill_divergence(student_logits, reference_logits, alpha=ANCHOR_ALPHA, topk=topk, add_tail=add_tail)


def sampled_token_loss(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """The sampled-token variant (paper Table 6): a policy gradient whose per-token advantage is the teacher /
    student log-ratio at the token actually sampled.

    Takes the log-probability of the sampled token under each model `[...]`. The value is a surrogate: its
    gradient, (log p_S − log p_T)·∇log p_S, is the single-sample gradient of KL(S‖T).
    """
    return (student_logp - teacher_logp).detach() * student_logp


def importance_weight(logp_new: Tensor, logp_behaviour: Tensor, clip: float = 2.0) -> Tensor:
    """min(π_θ(y)/π_behaviour(y), clip) per token, detached: corrects rollouts drawn by another engine or reused
    across several updates. It is exactly 1 when the rollout is fresh and scored by the same model."""
    return torch.exp((logp_new.detach() - logp_behaviour.detach()).clamp(-20.0, 20.0)).clamp(max=clip)


def token_weights(lengths: Tensor, mode: Reduction = "seq-mean") -> Tensor:
    """The weight of every response token in the batch loss, flat, in sequence order.

    `seq-mean` (the paper): each sequence's mean over its tokens, then the mean over sequences, so token t of
    sequence i weighs 1 / (|y_i|·N). `token-mean`: every token weighs 1 / Σ|y_i|. Empty sequences carry no tokens
    and, under seq-mean, do not count in N.
    """
    lengths = lengths.long()
    if mode == "seq-mean":
        kept = lengths[lengths > 0]
        per_seq = 1.0 / (kept.float() * max(len(kept), 1))
        return per_seq.repeat_interleave(kept)
    if mode == "token-mean":
        total = int(lengths.sum())
        return torch.full((total,), 1.0 / max(total, 1))
    raise ValueError(f"unknown reduction {mode!r}; expected seq-mean or token-mean")


def aggregate(per_token: Tensor, mask: Tensor, mode: Reduction = "seq-mean") -> Tensor:
    """Reduce a padded `[B, T]` per-token loss with its `[B, T]` mask to a scalar (see `token_weights`)."""
    mask = mask.bool()
    weights = token_weights(mask.sum(-1), mode).to(per_token.device)
    return (per_token[mask] * weights).sum()


# ---------------------------------------------------------------------------------------------------------------
# Chunked path: logits only at response positions, from hidden states, a few rows at a time.


@dataclass
class ChunkedOutput:
    loss: Tensor  # [N] per-token loss (student graph attached)
    student_logp: Tensor  # [N] log p_S of the sampled token, detached
    teacher_logp: Tensor  # [N] log p_T of the sampled token
    agree: Tensor  # [N] bool: teacher and student have the same top-1 token
    entropy: Tensor  # [N] student entropy (nats)


Head = Callable[[Tensor], Tensor]


def chunked_divergence(student_hidden: Tensor, teacher_hidden: Tensor, student_head: Head, teacher_head: Head,
                       target_ids: Tensor, *, alpha: float = 0.5, topk: int | None = 100, add_tail: bool = True,
                       objective: Literal["logits", "sampled-token"] = "logits", temperature: float = 1.0,
                       trust_region_rate: float | None = None, chunk_size: int = 512,
                       checkpoint: bool = True) -> ChunkedOutput:
    """`distill_divergence` over N response tokens given their final hidden states `[N, H]` and the two LM heads.

    The vocabulary projection runs `chunk_size` rows at a time; with `checkpoint=True` each chunk's logits are
    recomputed in the backward pass instead of being kept, so memory holds `chunk_size × V` logits at a time and
    never `N × V`. `target_ids [N]` are the sampled tokens (for the sampled-token objective and the statistics).
    `trust_region_rate=r` moves the teacher logits toward the (detached) student's: (1−r)·z_T + r·z_S.
    """
    if student_hidden.shape[0] != teacher_hidden.shape[0] or student_hidden.shape[0] != target_ids.shape[0]:
        raise ValueError("student hidden, teacher hidden and target ids must hold the same number of tokens")

    def one_chunk(hs: Tensor, ht: Tensor, ids: Tensor) -> tuple[Tensor, ...]:
        zs = student_head(hs).float() / temperature
        with torch.no_grad():
            zt = teacher_head(ht.detach()).float() / temperature
            if trust_region_rate is not None:
                zt = torch.lerp(zt, zs.detach(), trust_region_rate)
            t_tok = zt.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(zt, -1)
            agree = zs.detach().argmax(-1) == zt.argmax(-1)
            s_lse = torch.logsumexp(zs.detach(), -1)
            p = torch.softmax(zs.detach(), -1)
            entropy = s_lse - torch.einsum("cv,cv->c", p, zs.detach())  # H = lse(z) − Σ p·z, with no [C, V] product
            del p
        if objective == "sampled-token":
            s_tok = zs.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(zs, -1)
            loss = sampled_token_loss(s_tok, t_tok)
        else:
            s_tok = zs.detach().gather(-1, ids[:, None])[:, 0] - s_lse
            loss = distill_divergence(zs, zt, alpha=alpha, topk=topk, add_tail=add_tail)
        return loss, s_tok.detach(), t_tok, agree, entropy

    parts = []
    for start in range(0, student_hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (student_hidden[sl], teacher_hidden[sl], target_ids[sl])
        if checkpoint and torch.is_grad_enabled() and student_hidden.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(one_chunk, *args, use_reentrant=False))
        else:
            parts.append(one_chunk(*args))
    if not parts:
        empty = student_hidden.new_zeros(0, dtype=torch.float32)
        return ChunkedOutput(empty, empty, empty, torch.zeros(0, dtype=torch.bool), empty)
    cols = list(zip(*parts, strict=True))
    return ChunkedOutput(*(torch.cat(c) for c in cols))
