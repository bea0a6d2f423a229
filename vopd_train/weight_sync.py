"""The trainer's weights streamed into an inference engine (vLLM) in buckets, without a whole copy of the model.

A sync hands the engine the weights under their checkpoint names (as `save_pretrained` writes them), one bucket
at a time: each bucket's tensors are cast to the engine's dtype, gathered whole (under FSDP each rank holds a
shard of every parameter: the shard is cast first, then gathered, so the collective moves the engine's dtype),
loaded, and freed before the next bucket is gathered. The extra memory of a sync is one bucket
(`bucket_bytes`), whatever the model's size.

Groups. vLLM fuses sibling weights into one layer (a decoder layer's q, k and v projections into `qkv_proj`,
gate and up into `gate_up_proj`), and its in-place reload rebuilds a layer from the weights one call sends: a
layer sent in part would get uninitialised memory for the rest. So the unit of a bucket is a *group*, every
weight under one module's parent (`...layers.3.self_attn`, `...layers.3.mlp`, `...layers.3` for its norms): a
bucket holds whole groups. The Qwen-VL families fuse only within such a group. A group larger than the bucket
is sent alone (the bound is then that group).

LoRA (a PEFT model): only the groups that hold an adapted layer (or another trained parameter) are sent; each
adapted layer as one merged weight W + ΔW over its active adapters (the base itself is left untouched), the rest
of its group (biases, unadapted siblings) as it is, since the engine rebuilds fused layers whole. The frozen rest
of the model is what the engine loaded at start.

Tied weights (an LM head tied to the input embeddings) are sent once, under the name `named_parameters` keeps
first (the embeddings'), which is the name the checkpoint holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

DEFAULT_BUCKET_MB = 512


@dataclass
class Entry:
    """One tensor of a sync: its module-tree name (LoRA's `.base_layer` left out) and how to make it."""

    name: str
    param: Tensor  # the live parameter (a DTensor under FSDP); for a LoRA layer the base weight
    lora: Any = None  # the peft LoraLayer whose delta is added to `param`

    def full_bytes(self, dtype: torch.dtype) -> int:
        return self.param.numel() * dtype.itemsize

    def make(self, dtype: torch.dtype) -> Tensor:
        """The whole tensor in `dtype`: merged (LoRA), cast on this rank's shard, then gathered (FSDP).
        Without FSDP and in the parameter's own dtype it is the live parameter itself, never a copy."""
        with torch.no_grad():
            t = self.param.detach()
            if self.lora is not None:
                t = _merged(self.lora, t)
            t = t.to(dtype)
            full = getattr(t, "full_tensor", None)  # a DTensor: one all-gather, on every rank in the same order
            return full() if full is not None else t


@dataclass
class Group:
    key: str
    entries: list[Entry] = field(default_factory=list)


@dataclass
class SyncStats:
    buckets: int = 0
    tensors: int = 0
    bytes: int = 0
    largest_bucket: int = 0  # bytes of the largest bucket handed over
    seconds: float = 0.0


def group_key(name: str) -> str:
    """The module a weight's group is named by: its module's parent (`a.b.q_proj.weight` → `a.b`)."""
    parts = name.split(".")
    return ".".join(parts[:-2])


def sync_groups(model: Any) -> list[Group]:
    """Every group a sync sends, in module order (identical on every rank)."""
    if hasattr(model, "get_base_model"):
        return _lora_groups(model.get_base_model())
    groups: dict[str, Group] = {}
    for name, p in model.named_parameters():  # tied parameters once, under their first name
        groups.setdefault(group_key(name), Group(group_key(name))).entries.append(Entry(name, p))
    return list(groups.values())


def _lora_groups(hf: Any) -> list[Group]:
    from peft.tuners.lora import LoraLayer

    adapted: dict[str, Any] = {}  # clean module name → its LoraLayer
    for name, module in hf.named_modules():
        if isinstance(module, LoraLayer):
            adapted[name] = module
    entries: dict[str, Entry] = {}
    trained_groups = {group_key(f"{m}.weight") for m in adapted}
    for name, p in hf.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue  # adapter factors are merged below; a modules_to_save copy replaces its original
        clean = name.replace(".base_layer", "")
        if ".modules_to_save." in clean:
            head, _, rest = clean.partition(".modules_to_save.")
            clean = f"{head}.{rest.split('.', 1)[1]}"
        module = clean.rsplit(".", 1)[0]
        lora = adapted.get(module) if clean.endswith(".weight") else None
        entries.setdefault(clean, Entry(clean, p, lora))
        if p.requires_grad:
            trained_groups.add(group_key(clean))
    groups: dict[str, Group] = {}
    for clean, entry in entries.items():
        key = group_key(clean)
        if key in trained_groups:
            groups.setdefault(key, Group(key)).entries.append(entry)
    return list(groups.values())


def _merged(layer: Any, weight: Tensor) -> Tensor:
    """W + Σ ΔW over the layer's active adapters, in W's dtype (peft's own delta: scaling, fan-in-fan-out)."""
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return weight
    for name in layer.active_adapters:
        if name in layer.lora_A:
            weight = weight + layer.get_delta_weight(name).to(weight.dtype)
    return weight


def buckets(groups: list[Group], dtype: torch.dtype, bucket_bytes: int, world_size: int = 1) -> list[list[Group]]:
    """Whole groups packed in order into buckets whose peak cost stays within `bucket_bytes`: the gathered
    tensors plus, while one is being gathered, its cast shard (1/world_size of it)."""
    out: list[list[Group]] = []
    current: list[Group] = []
    total = largest = 0
    for group in groups:
        size = sum(e.full_bytes(dtype) for e in group.entries)
        top = max((e.full_bytes(dtype) for e in group.entries), default=0)
        if current and total + size + max(largest, top) // world_size > bucket_bytes:
            out.append(current)
            current, total, largest = [], 0, 0
        current.append(group)
        total += size
        largest = max(largest, top)
    if current:
        out.append(current)
    return out


def stream_into(load: Callable[[list[tuple[str, Tensor]]], Any], model: Any, *, dtype: torch.dtype,
                bucket_bytes: int, world_size: int = 1) -> SyncStats:
    """Hand `model`'s weights to `load`, one bucket per call, as (checkpoint name, tensor) pairs in `dtype`.
    Every rank of an FSDP job must call this together (each gather is a collective). `load` must not keep the
    tensors: each bucket is freed as soon as it returns."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    stats = SyncStats()
    start = time.perf_counter()
    for bucket in buckets(sync_groups(model), dtype, bucket_bytes, world_size):
        tensors: dict[str, Tensor] = {}
        for group in bucket:
            for entry in group.entries:
                tensors[entry.name] = entry.make(dtype)
        pairs = list(checkpoint_names(hf, tensors).items())
        size = sum(t.numel() * t.element_size() for _, t in pairs)
        stats.tensors += len(pairs)
        del tensors
        load(pairs)
        pairs.clear()  # the last references to this bucket's tensors: freed before the next one is gathered
        stats.buckets += 1
        stats.bytes += size
        stats.largest_bucket = max(stats.largest_bucket, size)
    stats.seconds = time.perf_counter() - start
    return stats


def export_weights(model: Any, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Every tensor a sync sends, in one dict under checkpoint names (the whole model at once: for tests and
    small models; the trainer streams with `stream_into`). `dtype` defaults to the parameters' own."""
    out: dict[str, Tensor] = {}
    if dtype is None:
        dtype = next(iter(model.parameters())).dtype
    stream_into(lambda pairs: out.update(pairs), model, dtype=dtype, bucket_bytes=2**62)
    return out


def checkpoint_names(hf: Any, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Module names → checkpoint names, by the conversion transformers itself reverts at save time (e.g. Qwen2-VL's
    `model.language_model.*` is saved as `model.*`, `model.visual.*` as `visual.*`). Within a bucket, since a
    conversion may combine the tensors of one module."""
    if not hasattr(hf, "config"):
        return weights
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 keeps checkpoint names in the module tree
        return weights
    return revert_weight_conversion(hf, weights)


__all__ = ["DEFAULT_BUCKET_MB", "Entry", "Group", "SyncStats", "buckets", "checkpoint_names", "export_weights",
           "group_key", "stream_into", "sync_groups"]
