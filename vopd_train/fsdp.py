"""FSDP2 for the trainer: which modules become units, and the few steps FSDP does not do for us.

Units (bottom-up): every decoder layer and every vision block, then the vision tower, then the backbone under
the LM head, then the whole model as the root. The trainer calls the backbone, the vision tower and the LM head
directly (it never asks for full-vocabulary logits), so each of those must be a unit of its own or outside FSDP:

- the backbone and the vision tower are units, so a direct call all-gathers their own parameters;
- the LM head (and the input embeddings when they are tied to it) stays outside FSDP, replicated on every rank.
  The loss calls it once per chunk of response tokens, and ranks hold different numbers of tokens: as a unit it
  would issue a different number of collectives on each rank. Its gradient, when it has one, is summed over ranks
  here (`reduce_replicated_grads`).

Gradients: the trainer weighs every token so that the weights sum to 1 over the *global* batch, so the global
gradient is the sum of the ranks' gradients. FSDP averages by default; its divide factor is set to 1 here.

On a GPU parameters are all-gathered in bf16 and gradients reduced in fp32, over fp32 master weights; on a CPU
everything stays fp32.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from vopd_train.rollout import backbone, lm_head

BLOCK_LISTS = ("layers", "blocks")  # the ModuleLists of decoder layers and vision blocks (Qwen-VL naming)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place, so it is the same tree)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def block_modules(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer and vision block, in module order."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
            out.extend(module)
    return out


def replicated_params(model: nn.Module) -> set[nn.Parameter]:
    """Parameters kept outside FSDP: the LM head's (with tied embeddings, the same tensor)."""
    return set(lm_head(model).parameters())


def shard_model(model: nn.Module, device: str) -> nn.Module:
    """Apply FSDP2 to `model` in place (units as in the module docstring) and make its first forward through the
    root, which FSDP requires before any unit is called on its own."""
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if str(device).startswith("cuda") else MixedPrecisionPolicy())
    # FSDP warns that a unit returns a view (the backbone's hidden states); they are only ever indexed, never
    # modified in place, which is what the warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    ignored = replicated_params(model)
    kw: dict[str, Any] = {"mp_policy": mp, "ignored_params": ignored}
    for block in block_modules(model):
        fully_shard(block, **kw)
    base = backbone(model)
    visual = getattr(base, "visual", None)
    if visual is not None:
        fully_shard(visual, **kw)
    fully_shard(base, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied sum
    _root_forward(model, device)
    return model


@torch.no_grad()
def _root_forward(model: nn.Module, device: str) -> None:
    """A one-token text forward through the root: FSDP decides which unit is the root on the first forward."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        model.train(was_training)


def reduce_replicated_grads(model: nn.Module) -> None:
    """Sum the gradients of the replicated (non-FSDP) trainable parameters over ranks."""
    grads = [p.grad for p in _ordered_replicated(model) if p.requires_grad and p.grad is not None]
    for g in grads:
        dist.all_reduce(g, op=dist.ReduceOp.SUM)


def _ordered_replicated(model: nn.Module) -> list[nn.Parameter]:
    """The replicated parameters in module order (identical on every rank, unlike a set's order)."""
    wanted = replicated_params(model)
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if p in wanted and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float, device: str | torch.device) -> float:
    """Clip the global gradient norm of a mix of FSDP-sharded (DTensor) and replicated parameters, as
    `torch.nn.utils.clip_grad_norm_` does for one process. Returns the norm before clipping."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        if isinstance(g, DTensor):
            sharded += g.to_local().double().pow(2).sum().cpu()
        else:
            replicated += g.double().pow(2).sum().cpu()
    sharded = sharded.to(device)
    dist.all_reduce(sharded, op=dist.ReduceOp.SUM)
    total = math.sqrt(float(sharded) + float(replicated))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return total
