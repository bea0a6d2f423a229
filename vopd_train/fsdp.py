"""FSDP2 for the trainer: which modules become units, and the few steps FSDP does not do for us.

Units (bottom-up): every decoder layer and every vision block, then the vision tower, then the LM head (with the
input embeddings when they are tied to it: one parameter, one unit), then the backbone under the LM head, then
the whole model as the root. Every parameter is sharded; no rank holds a whole copy of any of them outside the
moment a unit is gathered for its forward or backward.

The trainer calls the backbone and the vision tower directly (it never asks for full-vocabulary logits), so each
is a unit of its own. The LM head is the exception: the loss applies it once per chunk of response tokens, and
ranks hold different numbers of tokens, so calling the unit per chunk would issue a different number of
collectives on each rank. Instead the loss gathers the head once (`gathered_heads`: one all-gather, the same on
every rank) and applies its `forward` without FSDP's hooks, as many times as it needs; the gradients of all the
chunks add up in the gathered weight, and FSDP reduce-scatters them at the end of the backward pass, with the
rest of the unit's gradient (the embedding's, when tied). The result is exactly the replicated head's: the same
weights in the same arithmetic, and the per-rank gradients summed.

Gradients: the trainer weighs every token so that the weights sum to 1 over the *global* batch, so the global
gradient is the sum of the ranks' gradients. FSDP averages by default; its divide factor is set to 1 here.

On a GPU parameters are all-gathered in bf16 and gradients reduced in fp32, over fp32 master weights; on a CPU
everything stays fp32.

`shard_model` only decides the layout: it works on a model whose parameters are still on the meta device (the
trainer shards before any weight is read: `sharded_load`), and it takes the process group as an argument, so a
memory plan can apply it to a meta model with a fake process group.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from vopd_train.rollout import backbone, lm_head

# Under torchrun the trainer builds the model on the meta device and reads only its shards (`sharded_load`):
# no rank ever holds the whole model. The memory plan (`vopd_train.plan`) reads this.
LOADS_SHARDED = True
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


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The LM head, and the input embeddings when they share its weight (they must be one unit then)."""
    hf = _unwrapped(model)
    head = lm_head(model)
    embed = hf.get_input_embeddings()
    shared = {id(p) for p in head.parameters()} & {id(p) for p in embed.parameters()}
    return [embed, head] if shared else [head]


def mesh_of(device: str | torch.device, group: dist.ProcessGroup | None = None) -> DeviceMesh:
    """A one-dimensional device mesh over `group` (the default group when None). A CUDA device's mesh where CUDA
    is present; elsewhere a CPU mesh, which lays a meta model out the same way (a memory plan made on a machine
    without a GPU, over a fake process group)."""
    kind = "cuda" if str(device).startswith("cuda") and torch.cuda.is_available() else "cpu"
    return DeviceMesh.from_group(group if group is not None else dist.group.WORLD, kind)


def shard_model(model: nn.Module, device: str | torch.device, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Apply FSDP2 to `model` in place (units as in the module docstring) over `group` and return it.

    A pure layout step: no collective, no forward, no weight read, so `model` may still be on the meta device.
    `device` picks the mixed-precision policy (bf16 compute on a GPU) and the mesh's device type. A model built
    with real weights is usable at once; a meta-device one needs `to_empty` and its weights (`sharded_load`),
    and any model needs `prepare_root` before a unit is called on its own.
    """
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if str(device).startswith("cuda") else MixedPrecisionPolicy())
    # FSDP warns that a unit returns a view (the backbone's hidden states); they are only ever indexed, never
    # modified in place, which is what the warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    kw: dict[str, Any] = {"mp_policy": mp, "mesh": mesh_of(device, group)}
    for block in block_modules(model):
        fully_shard(block, **kw)
    base = backbone(model)
    visual = getattr(base, "visual", None)
    if visual is not None:
        fully_shard(visual, **kw)
    fully_shard(head_modules(model), **kw)
    fully_shard(base, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-multiplied sum
    # transformers' generate reads this to keep all ranks decoding in step (synced_gpus), as FSDP needs
    _unwrapped(model)._is_fsdp_managed_module = True
    return model


def is_sharded(model: Any) -> bool:
    return isinstance(model, FSDPModule)


@torch.no_grad()
def prepare_root(model: nn.Module, device: str | torch.device) -> None:
    """A one-token text forward through the root: FSDP decides which unit is the root on the first forward, and
    the trainer then calls inner units (the backbone) directly."""
    was_training = model.training
    model.eval()
    try:
        ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        model.train(was_training)


def _head_unit(model: nn.Module) -> FSDPModule:
    unit = lm_head(model)
    if not isinstance(unit, FSDPModule):
        raise RuntimeError("the LM head is not an FSDP unit (shard_model was not applied)")
    return unit


@contextlib.contextmanager
def gathered_heads(*models: Any) -> Iterator[None]:
    """Gather the LM heads of the sharded `models` for a loss (one all-gather each, on every rank alike); they
    are sharded again on leaving. Keep the backward pass inside: the loss's chunks recompute their logits there.

    Enter it after the forwards whose hidden states the loss reads: when the input embeddings share the head's
    unit, a backbone forward reshards the unit as it ends. A head with a gradient is also resharded by FSDP at the
    end of the backward pass, right after its gradient has been reduce-scattered; leaving here then changes
    nothing for it. Unsharded models pass through."""
    units = [_head_unit(m) for m in models if is_sharded(m)]
    for u in units:
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of FSDP-sharded (DTensor) parameters as `torch.nn.utils.clip_grad_norm_`
    does for one process, without reading anything back to the host. Returns the norm before clipping (a
    0-dim tensor on the parameters' device)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if any(not isinstance(g, DTensor) for g in grads):
        raise RuntimeError("a trainable parameter is not sharded: every gradient should be a DTensor")
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in local]).sum()
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=grads[0].device_mesh.get_group())
    total = squares.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local, coef.to(local[0].dtype))
    return total
