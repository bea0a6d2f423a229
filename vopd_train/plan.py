"""The memory plan of a `vopd distill` run, per GPU, before launch (`vopd check MODEL --plan --gpus N ...`).

Nothing is loaded: the model is built from its config on the meta device, so a 9B plan takes seconds on a laptop.

Where each row comes from:

- **Parameter rows** (weights, gradients, optimizer, teacher, the all-gathered units in flight, the engine's
  weights) are read from the real sharded modules: the meta model (LoRA-wrapped when asked) goes through the
  trainer's own `vopd_train.fsdp.shard_model` under a fake process group of world size N (`sharded_layout`), and
  every parameter's local shard on rank 0 is counted (rank 0 holds the largest shard: FSDP pads the first dimension
  to a multiple of N and rank 0's chunk is never the short one). A parameter FSDP leaves out (today: the LM head)
  is counted whole. Gradients exist for trainable parameters only, in the parameter's dtype; AdamW keeps two
  moments per trainable element, also in the parameter's dtype. Whatever the sharding does, the plan follows it.
- **Activations** are computed from the model's shapes and the distill options (`activation_bytes`): the tokens of
  the largest micro-batch (prompt once per prompt with prefix sharing, else once per response), times the bytes
  each layer keeps for the backward pass (a count of the tensors a Qwen-style layer saves, documented per term
  below), or with gradient checkpointing each layer's input plus one layer recomputed. This is an estimate
  (about ±30%): torch's FSDP memory tracker could not measure it (see docs/results/memory-plan.md).
- **Rollout rows**: transformers `generate` on the training model holds every sequence's cache at full length;
  a vLLM engine reserves `--vllm-gpu-memory-utilization` of the GPU for its bf16 weights (1/K of them with
  `--vllm-tensor-parallel-size K`: one engine over K GPUs), its working memory and its KV cache (a step's
  sequences need as much per GPU either way: K ranks' prompts, 1/K of the KV heads), and with `--vllm-sleep-mode`
  gives it all back while the trainer trains.
- **Weight sync** (vLLM): today every parameter is gathered whole, in its dtype, at once (LoRA: the merged adapted
  layers); with a `sync_bucket_mb` setting only one bucket is.
- **Set-up**: where `vopd_train.fsdp` says the trainer loads straight into the shards (`LOADS_SHARDED`), set-up
  holds no more than the shards; otherwise every rank loads the whole model (and the teacher's copy) first.

Every phase adds a fixed allowance for the CUDA context, NCCL buffers and allocator slack.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vopd_bench.errors import VopdError
from vopd_train.config import DistillConfig

GIB = 2**30
FIXED_OVERHEAD = int(1.5 * GIB)  # CUDA context, NCCL buffers, allocator slack: not modelled, a fixed allowance
VLLM_WORKING = 2 * GIB  # vLLM's profiled activations and CUDA graphs, inside its share (an estimate)
LOSS_BUFFERS = 10  # float32 [chunk × vocabulary] buffers alive in one loss chunk (see `loss_chunk_bytes`)


@dataclass(frozen=True)
class Setting:
    """What the plan assumes beyond the distill options: the hardware and the largest prompt."""

    gpus: int
    gpu_gib: float
    prompt_tokens: int = 1200  # the longest prompt, its image tokens included
    image_tokens: int = 1024  # the image's tokens in the language model (the vision tower sees merge² times more)

    def check(self) -> Setting:
        if self.gpus < 1:
            raise VopdError("--gpus must be ≥ 1")
        if not self.gpu_gib > 0:
            raise VopdError("--gpu-memory must be positive (GiB per GPU)")
        if self.prompt_tokens < 1 or not 0 <= self.image_tokens <= self.prompt_tokens:
            raise VopdError("--prompt-tokens must be ≥ 1 and --image-tokens between 0 and --prompt-tokens")
        return self


# ---------------------------------------------------------------------- the sharded layout


@dataclass(frozen=True)
class Layout:
    """What rank 0 holds after `fsdp.shard_model` at world size N, counted from the modules themselves."""

    world_size: int
    params_total: int  # elements of the whole model (adapters included)
    weight_bytes: int  # rank 0: every local shard, plus every parameter FSDP left whole
    trainable_bytes: int  # rank 0's share of the trainable parameters (their gradients take as much)
    trainable_elements: int
    replicated_bytes: int  # parameters outside FSDP, whole on every rank (today: the LM head)
    replicated_trainable_bytes: int
    replicated_names: tuple[str, ...]
    adapter_bytes: int  # rank 0's share of the LoRA parameters
    engine_elements: int  # what an inference engine holds: the model without adapters
    gathered_bytes: int  # the largest set of units all-gathered at once, in the compute dtype
    unit_grad_bytes: int  # the largest unit's unsharded trainable gradient during its reduce-scatter (fp32)
    adapted_elements: int  # LoRA: the base weights of the adapted layers (what a LoRA sync sends)
    sync_elements: int  # what a weight sync sends (vopd_train.weight_sync.sync_groups: LoRA, the adapted groups)
    largest_sync_group: int  # elements of its largest group, which a bucket holds whole however small
    param_bytes: int  # bytes per element of the weights (cfg.dtype)
    units: int  # FSDP units
    vision_trainable: bool
    prefix_shared: bool  # the trainer's own check: would it share prompt prefixes with these options?
    why_not_shared: str | None


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A one-process stand-in for N ranks: collectives do nothing, sharding sees rank 0 of N."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise VopdError("vopd check --plan runs in one process: start it without torchrun")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_on_meta(model_config: Any, cfg: DistillConfig) -> Any:
    """The model as the trainer builds it (its dtype, LoRA, gradient checkpointing), with no weights."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vopd_train.trainer import _wrap_lora

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(model_config, dtype=dtype,
                                                            trust_remote_code=cfg.trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise VopdError(f"cannot build {getattr(model_config, 'model_type', '?')} from its config: "
                        f"{' '.join(str(e).split())[:200]}") from None
    if cfg.gradient_checkpointing:
        from vopd_train import recompute

        recompute.enable(model)
    if cfg.lora:
        model = _wrap_lora(model, cfg)
    model.train()
    return model


@contextlib.contextmanager
def _without_root_forward(fsdp: Any) -> Iterator[None]:
    """`shard_model` ends with a one-token forward through the root, which FSDP needs before training; a meta model
    has no weights to run it with, and the plan only reads the layout the `fully_shard` calls leave behind."""
    original = getattr(fsdp, "_root_forward", None)
    if original is None:  # a sharding that no longer runs one
        yield
        return
    fsdp._root_forward = lambda *args, **kwargs: None
    try:
        yield
    finally:
        fsdp._root_forward = original


def shard_for_plan(model: Any) -> Any:
    """The one call into the trainer's sharding: exactly what `vopd distill` applies under torchrun on a GPU."""
    from vopd_train import fsdp

    with _without_root_forward(fsdp):
        return fsdp.shard_model(model, "cuda") or model


def sharded_layout(model_config: Any, cfg: DistillConfig, world_size: int) -> Layout:
    """The layout on rank 0 of `world_size` GPUs. One GPU is one process without FSDP, as `vopd distill` runs."""
    from vopd_train.prefix import why_not_shared

    if world_size == 1:
        model = build_on_meta(model_config, cfg)
        return read_layout(model, 1, why_not_shared(model))
    with fake_process_group(world_size):
        model = build_on_meta(model_config, cfg)
        reason = why_not_shared(model)
        shard_for_plan(model)
        return read_layout(model, world_size, reason)


def read_layout(model: Any, world_size: int, why_not: str | None = None) -> Layout:
    """Count rank 0's parameters in an FSDP2-sharded model (meta or real)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    weight = trainable = trainable_n = replicated = replicated_trainable = adapter = 0
    total = engine = 0
    repl_names = []
    for name, p in params.items():
        local = p.to_local() if isinstance(p, DTensor) else p
        nbytes = local.numel() * p.element_size()
        weight += nbytes
        total += p.numel()
        is_adapter = ".lora_" in name
        if not is_adapter:
            engine += p.numel()
        else:
            adapter += nbytes
        if p.requires_grad:
            trainable += nbytes
            trainable_n += local.numel()
        if not isinstance(p, DTensor) and world_size > 1:  # one process shards nothing: nothing is "left out"
            replicated += nbytes
            repl_names.append(name)
            if p.requires_grad:
                replicated_trainable += nbytes

    # FSDP units and the parameters each manages itself (not through a unit below it)
    units = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    unit_names = [n for n, _ in units]

    def owner(pname: str) -> str | None:
        best = None
        for u in unit_names:
            if (u == "" or pname.startswith(u + ".")) and (best is None or len(u) > len(best)):
                best = u
        return best

    own: dict[str, int] = dict.fromkeys(unit_names, 0)
    own_train: dict[str, int] = dict.fromkeys(unit_names, 0)
    compute = {u: _compute_bytes(m, params) for u, m in units}
    for name, p in params.items():
        if not isinstance(p, DTensor):
            continue
        u = owner(name)
        if u is None:
            continue
        own[u] += p.numel() * compute[u]
        if p.requires_grad:
            own_train[u] += p.numel() * 4  # reduce-scatter in float32

    def parent(u: str) -> str | None:
        cands = [v for v in unit_names if v != u and (v == "" or u.startswith(v + "."))]
        return max(cands, key=len) if cands else None

    gathered = 0
    for i, u in enumerate(unit_names):
        chain, a = 0, parent(u)
        while a is not None:
            chain += own[a]
            a = parent(a)
        sibling = next((v for v in unit_names[i + 1:] if parent(v) == parent(u)), None)
        gathered = max(gathered, chain + own[u] + (own[sibling] if sibling is not None else 0))

    adapted = 0
    for m in model.modules():
        if hasattr(m, "lora_A") and hasattr(m, "get_base_layer"):
            w = getattr(m.get_base_layer(), "weight", None)
            if w is not None:
                adapted += w.numel()

    from vopd_train.weight_sync import sync_groups

    group_sizes = [sum(e.param.numel() for e in g.entries) for g in sync_groups(model)]
    vision_trainable = any(p.requires_grad and (".visual." in n or n.startswith("visual."))
                           for n, p in params.items())
    elem = next((p.element_size() for n, p in params.items() if ".lora_" not in n), 4)
    return Layout(world_size=world_size, params_total=total, weight_bytes=weight, trainable_bytes=trainable,
                  trainable_elements=trainable_n, replicated_bytes=replicated,
                  replicated_trainable_bytes=replicated_trainable, replicated_names=tuple(repl_names),
                  adapter_bytes=adapter, engine_elements=engine, gathered_bytes=gathered,
                  unit_grad_bytes=max(own_train.values(), default=0), adapted_elements=adapted,
                  sync_elements=sum(group_sizes), largest_sync_group=max(group_sizes, default=0), param_bytes=elem,
                  units=len(units), vision_trainable=vision_trainable, prefix_shared=why_not is None,
                  why_not_shared=why_not)


def _compute_bytes(unit: Any, params: dict[str, Any]) -> int:
    """Bytes per element a unit all-gathers: its mixed-precision policy's parameter dtype, else the weights'."""
    try:
        dtype = unit._get_fsdp_state()._mp_policy.param_dtype
    except AttributeError:
        dtype = None
    if dtype is None:
        return next(iter(params.values())).element_size()
    import torch

    return torch.empty((), dtype=dtype, device="meta").element_size()


# ---------------------------------------------------------------------- shapes and activations


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    layers: int
    full_layers: int  # softmax attention layers (the rest are linear attention)
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_attention: bool
    lin_k_heads: int
    lin_v_heads: int
    lin_k_dim: int
    lin_v_dim: int
    conv_kernel: int
    state_bytes: int  # linear-attention recurrent state element (mamba_ssm_dtype)
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    merge: int  # image tokens per language token along each side

    @classmethod
    def of(cls, config: Any) -> Shapes:
        tc = config.get_text_config() if hasattr(config, "get_text_config") else config
        vc = getattr(config, "vision_config", None)
        hidden = tc.hidden_size
        heads = tc.num_attention_heads
        layer_types = list(getattr(tc, "layer_types", None) or ["full_attention"] * tc.num_hidden_layers)
        full = sum(1 for t in layer_types if t != "linear_attention")
        state = 4 if str(getattr(tc, "mamba_ssm_dtype", "float32")).endswith("32") else 2
        v_hidden = getattr(vc, "hidden_size", None) or getattr(vc, "embed_dim", 0) if vc is not None else 0
        v_inter = (getattr(vc, "intermediate_size", None) or int(v_hidden * getattr(vc, "mlp_ratio", 4))
                   if vc is not None else 0)
        return cls(
            hidden=hidden, intermediate=tc.intermediate_size, layers=tc.num_hidden_layers, full_layers=full,
            heads=heads, kv_heads=getattr(tc, "num_key_value_heads", heads) or heads,
            head_dim=getattr(tc, "head_dim", None) or hidden // heads, vocab=tc.vocab_size,
            # Qwen3.5 and Qwen3-Next always gate the attention output (their configs say so, transformers' do not)
            gated_attention=bool(getattr(tc, "attn_output_gate",
                                         getattr(tc, "model_type", "") in ("qwen3_5_text", "qwen3_next"))),
            lin_k_heads=getattr(tc, "linear_num_key_heads", 0) or 0,
            lin_v_heads=getattr(tc, "linear_num_value_heads", 0) or 0,
            lin_k_dim=getattr(tc, "linear_key_head_dim", 0) or 0, lin_v_dim=getattr(tc, "linear_value_head_dim", 0) or 0,
            conv_kernel=getattr(tc, "linear_conv_kernel_dim", 0) or 0, state_bytes=state,
            vision_hidden=v_hidden or 0, vision_intermediate=v_inter or 0,
            vision_depth=(getattr(vc, "depth", None) or getattr(vc, "num_hidden_layers", 0) or 0) if vc is not None else 0,
            merge=(getattr(vc, "spatial_merge_size", 2) or 2) if vc is not None else 2,
        )

    @property
    def linear_layers(self) -> int:
        return self.layers - self.full_layers

    def kv_bytes_per_token(self, elem: int = 2) -> int:
        """Keys and values of every softmax-attention layer."""
        return 2 * self.kv_heads * self.head_dim * self.full_layers * elem

    def state_bytes_per_sequence(self, elem: int = 2) -> int:
        """Linear attention keeps a recurrent state and a conv window per sequence instead of keys and values."""
        if not self.linear_layers:
            return 0
        conv = max(self.conv_kernel - 1, 0) * (2 * self.lin_k_heads * self.lin_k_dim + self.lin_v_heads * self.lin_v_dim)
        recurrent = self.lin_v_heads * self.lin_k_dim * self.lin_v_dim
        return self.linear_layers * (recurrent * self.state_bytes + conv * elem)


def layer_bytes_per_token(s: Shapes, residual: int, act: int = 2) -> tuple[int, int]:
    """Bytes one (softmax, linear-attention) decoder layer keeps per token for its backward pass, under bf16 autocast.

    `residual` is the residual stream's element size: 4 with float32 master weights (the embedding output, hence
    every residual add, stays float32), 2 with --dtype bfloat16. Each term is a tensor the layer's backward reads.
    """
    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    norm_in = residual * h + act * h  # RMSNorm input (residual dtype) and its bf16 output fed to the projections
    mlp = norm_in + 4 * act * s.intermediate  # gate, up, act(gate), act(gate)·up (the down projection's input)
    gate = 2 if s.gated_attention else 1
    attn = (norm_in
            + act * (gate * q + 2 * kv)  # q (and its output gate), k, v projections
            + 2 * act * (q + kv)  # q/k norms' outputs and the rotated q, k the kernel reads
            + act * q + 4 * s.heads  # attention output, its log-sum-exp (float32, per head)
            + (2 * act * q if s.gated_attention else 0)  # sigmoid(gate) and the gated output
            + act * q)  # the output projection's input
    lk, lv = s.lin_k_heads * s.lin_k_dim, s.lin_v_heads * s.lin_v_dim
    linear = 0
    if s.linear_layers:
        mixed = 2 * lk + lv
        linear = (norm_in
                  + act * mixed * 3  # the fused qkv projection, the causal conv's output and its SiLU
                  + act * lv  # the z gate
                  + act * 2 * lk  # L2-normalised q, k
                  + 4 * 64 * s.lin_v_heads  # the chunked kernel's per-chunk matrix (float32, chunks of 64)
                  + act * lv + 4 * lv + act * lv  # kernel output, the gated norm's float32 input and its output
                  + act * lv)  # the output projection's input
        linear += mlp
    return attn + mlp, linear


def vision_bytes_per_patch(s: Shapes, residual: int, act: int = 2) -> int:
    """Bytes one vision block keeps per patch: two LayerNorm inputs, fused qkv, rotated q/k, attention output, the
    projection input, and the MLP's input, hidden and activation."""
    h = s.vision_hidden
    return 2 * (residual * h + act * h) + act * 3 * h + act * 2 * h + act * h + act * h + 2 * act * s.vision_intermediate


@dataclass(frozen=True)
class MicroBatch:
    prompts: int
    sequences: int
    lm_tokens: int  # tokens through the language model with gradient
    response_tokens: int
    patches: int  # vision-tower inputs of the micro-batch's images


def micro_batch(cfg: DistillConfig, setting: Setting, shapes: Shapes, shared: bool) -> MicroBatch:
    """The largest micro-batch a rank runs (`Distiller._micro_batches`: whole prompts, every response full length)."""
    per_rank = math.ceil(cfg.batch_size / setting.gpus)
    prompts = min(max(1, cfg.micro_batch_size // cfg.n_rollouts), per_rank)
    seqs = prompts * cfg.n_rollouts
    p, r = setting.prompt_tokens, cfg.max_new_tokens
    tokens = prompts * p + seqs * r if shared and cfg.n_rollouts > 1 else seqs * (p + r)
    return MicroBatch(prompts, seqs, tokens, seqs * r, prompts * setting.image_tokens * shapes.merge ** 2)


def shares_prefix(cfg: DistillConfig, layout: Layout) -> bool:
    """Whether the trainer scores each prompt once for its n responses (`prefix.scored_hidden`)."""
    return cfg.prefix_sharing and cfg.n_rollouts > 1 and layout.prefix_shared


def activation_bytes(cfg: DistillConfig, setting: Setting, shapes: Shapes, layout: Layout) -> tuple[int, str]:
    """The student's stored activations for one micro-batch (+ one layer's backward), and how they were counted."""
    residual = 4 if cfg.dtype == "float32" else 2
    mb = micro_batch(cfg, setting, shapes, shares_prefix(cfg, layout))
    full, linear = layer_bytes_per_token(shapes, residual)
    per_token = shapes.full_layers * full + shapes.linear_layers * linear
    vis_patch = vision_bytes_per_patch(shapes, residual) if shapes.vision_depth else 0
    vision = mb.patches * vis_patch * shapes.vision_depth if layout.vision_trainable else 0
    if cfg.gradient_checkpointing:
        stored = mb.lm_tokens * residual * shapes.hidden * shapes.layers + mb.lm_tokens * max(full, linear)
        if layout.vision_trainable:
            vision = mb.patches * (residual * shapes.vision_hidden * shapes.vision_depth + vis_patch)
        how = (f"{mb.lm_tokens:,} tokens × (each layer's input + one layer recomputed)"
               f"{', vision tower likewise' if vision else ''}")
    else:
        stored = mb.lm_tokens * per_token
        how = f"{mb.lm_tokens:,} tokens × {per_token / 2**20:.1f} MiB kept per token over {shapes.layers} layers"
    cache = 0
    if shares_prefix(cfg, layout):
        # the prefix's cache, expanded to one row per response, sits inside the graph
        cache = mb.sequences * (setting.prompt_tokens * shapes.kv_bytes_per_token() + shapes.state_bytes_per_sequence())
        how += f"; the prefix cache expanded to {mb.sequences} responses"
    how = f"{mb.sequences} sequences of {mb.prompts} prompt(s): " + how
    return stored + vision + cache, how


def loss_chunk_bytes(cfg: DistillConfig, setting: Setting, shapes: Shapes, layout: Layout) -> tuple[int, str]:
    """One chunk of the vocabulary projection (`losses.chunked_divergence`, recomputed in the backward): both heads'
    bf16 logits, their float32 copies at the temperature, the student softmax, both masked copies for the tail and
    the log-sum-exp temporaries, about ten float32 [chunk × vocabulary] buffers; plus both models' final hidden
    states at every response token of the micro-batch."""
    mb = micro_batch(cfg, setting, shapes, shares_prefix(cfg, layout))
    chunk = min(cfg.loss_chunk_size, mb.response_tokens)
    residual = 4 if cfg.dtype == "float32" else 2
    hidden = 2 * mb.response_tokens * shapes.hidden * residual
    return LOSS_BUFFERS * 4 * chunk * shapes.vocab + hidden, f"{chunk} tokens × {shapes.vocab:,} ids"


# ---------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Row:
    name: str
    phases: dict[str, int]  # phase → bytes
    how: str = ""


PHASES = ("set-up", "training", "weight sync", "rollout")


@dataclass
class Plan:
    model: str
    cfg: DistillConfig
    setting: Setting
    layout: Layout
    shapes: Shapes
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    @property
    def limit(self) -> int:
        return int(self.setting.gpu_gib * GIB)

    def total(self, phase: str) -> int:
        return sum(r.phases.get(phase, 0) for r in self.rows)

    def phases(self) -> list[str]:
        return [p for p in PHASES if any(p in r.phases for r in self.rows)]

    @property
    def over(self) -> int:
        """Bytes over the GPU in the worst phase (≤ 0 when it fits)."""
        return max(self.total(p) for p in self.phases()) - self.limit

    @property
    def fits(self) -> bool:
        return self.over <= 0 and not any(n.startswith("does not start") for n in self.notes)


def plan_memory(model: str, model_config: Any, cfg: DistillConfig, setting: Setting,
                layouts: dict | None = None) -> Plan:
    """Every row of every phase, per GPU, for `cfg` on `setting.gpus` GPUs of `setting.gpu_gib` GiB."""
    setting.check()
    key = (setting.gpus, cfg.lora, cfg.lora_rank, cfg.lora_targets, cfg.dtype, cfg.gradient_checkpointing)
    cache = layouts if layouts is not None else {}
    if key not in cache:
        cache[key] = sharded_layout(model_config, cfg, setting.gpus)
    lay = cache[key]
    shapes = Shapes.of(model_config)
    vllm = cfg.rollout_engine == "vllm"
    rows: list[Row] = []
    notes: list[str] = []

    def add(name: str, how: str = "", **phases: int) -> None:
        phases = {k.replace("_", " ").replace("setup", "set-up"): v for k, v in phases.items()}
        rows.append(Row(name, phases, how))

    full_teacher = not cfg.lora and cfg.teacher in ("ema", "frozen", "trust-region")
    teacher = lay.weight_bytes if full_teacher else (lay.adapter_bytes if cfg.lora and cfg.teacher == "ema" else 0)
    anchor = lay.weight_bytes if cfg.crop_anchor > 0 and not cfg.lora and cfg.teacher in ("ema", "current") else 0
    grads, optim = lay.trainable_bytes, 2 * lay.trainable_bytes
    trainer = dict(training=0, weight_sync=0, rollout=0)  # resident through the step

    add("weights", f"rank 0's shards of {lay.params_total:,} parameters, {_dtype(lay.param_bytes)}"
        + (f"; {_names(lay.replicated_names)} whole on every GPU" if lay.replicated_bytes else ""),
        **{k: lay.weight_bytes for k in trainer})
    # today gradients stay allocated from one optimizer step to the next step's zero_grad, so through the sync and
    # the rollouts; the streamed sync issue 21 asks for (a `sync_bucket_mb` setting) frees them before the sync
    streamed = vllm and bool(getattr(cfg, "sync_bucket_mb", None))
    add("gradients", "one per trainable element, in the weights' dtype"
        + ("; freed before the weight sync" if streamed else "; kept until the next step's zero_grad"),
        training=grads, weight_sync=0 if streamed else grads, rollout=0 if streamed else grads)
    add("optimizer (AdamW)", "two moments per trainable element", **{k: optim for k in trainer})
    if teacher:
        add("teacher", "a sharded copy of the weights" if full_teacher else "the moving average of the adapter",
            **{k: teacher for k in trainer})
    if anchor:
        add("crop-anchor reference", "a frozen sharded copy of the starting weights", **{k: anchor for k in trainer})
    if lay.units:
        add("all-gathered units in flight", f"{lay.units} FSDP units: the largest unit with its ancestors and the "
            "prefetched next one, in the compute dtype, and one unit's float32 gradient while it is reduce-scattered",
            training=lay.gathered_bytes + lay.unit_grad_bytes, rollout=0 if vllm else lay.gathered_bytes)
    elif cfg.dtype == "float32":
        # one process, no FSDP: autocast's bf16 copy of every weight a layer reads stays saved for the backward
        add("bf16 weight copies (autocast)", "every weight cast once per forward and kept for the backward",
            training=lay.engine_elements * 2)
    act, act_how = activation_bytes(cfg, setting, shapes, lay)
    add("activations", act_how, training=act)
    loss, loss_how = loss_chunk_bytes(cfg, setting, shapes, lay)
    add("loss chunk", loss_how, training=loss)

    per_rank = math.ceil(cfg.batch_size / setting.gpus) * cfg.n_rollouts
    seq_len = setting.prompt_tokens + cfg.max_new_tokens
    kv_needed = per_rank * (seq_len * shapes.kv_bytes_per_token() + shapes.state_bytes_per_sequence())
    if vllm:
        share = int(cfg.vllm_gpu_memory_utilization * setting.gpu_gib * GIB)
        engine_bytes = 4 if cfg.vllm_dtype == "float32" else 2  # `auto` is the trainer's compute dtype: bf16 on GPUs
        tp = cfg.vllm_tensor_parallel_size
        if setting.gpus % tp:
            raise VopdError(f"--vllm-tensor-parallel-size {tp} must divide the number of GPUs ({setting.gpus})")
        # an engine over tp GPUs holds 1/tp of its weights on each (vLLM shards the layers; the few it keeps whole,
        # norms and biases, are negligible); its KV cache is this GPU's share, as with one engine per GPU
        engine_w = lay.engine_elements * engine_bytes // tp
        kv_budget = share - engine_w - VLLM_WORKING
        asleep = cfg.vllm_sleep_mode
        add(f"engine weights (vLLM, {'fp32' if engine_bytes == 4 else 'bf16'})",
            f"{lay.engine_elements:,} parameters, " + ("one engine per GPU" if tp == 1 else
                                                      f"one engine per {tp} GPUs: 1/{tp} of them on each"),
            training=0 if asleep else engine_w, weight_sync=engine_w, rollout=engine_w)
        add("engine working memory (vLLM)", "profiled activations and CUDA graphs (estimate)",
            training=0 if asleep else VLLM_WORKING, rollout=VLLM_WORKING)
        add("engine KV cache (vLLM)", f"its {cfg.vllm_gpu_memory_utilization:g} share less weights and working "
            f"memory; this step's {per_rank} sequences need {_gib(kv_needed)} at full length",
            training=0 if asleep else max(kv_budget, 0), weight_sync=0 if asleep else max(kv_budget, 0),
            rollout=max(kv_budget, 0))
        bucket = getattr(cfg, "sync_bucket_mb", None)
        if bucket:  # buckets of whole groups: one group larger than a bucket goes alone (vopd_train.weight_sync)
            sync = min(lay.sync_elements, max(int(bucket * 2**20) // engine_bytes, lay.largest_sync_group))
            sync *= engine_bytes
            sync_how = (f"one bucket of at most {bucket:g} MiB in the engine's dtype (or the largest group, "
                        f"{lay.largest_sync_group:,} elements, if larger)")
        elif cfg.lora:
            sync = lay.adapted_elements * lay.param_bytes
            sync_how = "every merged adapted layer gathered whole at once"
        else:  # a parameter FSDP left whole is handed over as it is, not copied
            sync = lay.params_total * lay.param_bytes - lay.replicated_bytes
            sync_how = "every sharded parameter gathered whole at once, in the weights' dtype"
        add("weight sync copy", sync_how, weight_sync=sync)
        if kv_budget <= 0:
            notes.append(f"does not start: vLLM's {cfg.vllm_gpu_memory_utilization:g} share "
                         f"({_gib(share)}) does not hold its weights and working memory ({_gib(engine_w + VLLM_WORKING)})")
        elif kv_budget < kv_needed:
            notes.append(f"vLLM's KV cache holds {kv_budget / kv_needed:.0%} of this step's rollouts at full length: "
                         "it runs them in waves (slower, not an error)")
    else:
        add("rollout cache (transformers generate)", f"{per_rank} sequences × {seq_len:,} tokens: keys and values"
            f"{' and linear-attention states' if shapes.linear_layers else ''}, plus one step's logits",
            rollout=kv_needed + per_rank * shapes.vocab * 4 * 2)

    loads_sharded = bool(getattr(_fsdp_module(), "LOADS_SHARDED", False))
    if setting.gpus > 1:
        whole = lay.params_total * lay.param_bytes
        if loads_sharded:
            add("set-up", "loaded straight into the shards", setup=lay.weight_bytes + teacher + anchor)
        else:
            copies = 1 + (1 if full_teacher else 0)
            add("set-up copy", f"the whole model, before sharding: every rank loads it{' and the teacher copies it' if copies > 1 else ''}",
                setup=whole * copies)
    add("fixed allowance", "CUDA context, NCCL buffers, allocator slack",
        **({"setup": FIXED_OVERHEAD} if setting.gpus > 1 else {}), **{k: FIXED_OVERHEAD for k in trainer})
    if lay.replicated_bytes and setting.gpus > 1:
        saved = lay.replicated_bytes - lay.replicated_bytes // setting.gpus
        saved_t = lay.replicated_trainable_bytes - lay.replicated_trainable_bytes // setting.gpus
        parts = [(saved, "weights"), (saved_t, "gradients"), (2 * saved_t, "optimizer"),
                 (saved if full_teacher else 0, "teacher")]
        said = ", ".join(f"{_gib(v)} off the {what}" for v, what in parts if v)
        notes.append(f"{_names(lay.replicated_names)} is whole on every GPU ({_gib(lay.replicated_bytes)} of weights). "
                     f"Sharded over {setting.gpus} GPUs: {said}; {_gib(sum(v for v, _ in parts))} per GPU in every "
                     "phase after set-up")
    if not lay.prefix_shared and cfg.prefix_sharing and cfg.n_rollouts > 1:
        notes.append(f"no prefix sharing: {lay.why_not_shared}")
    return Plan(model, cfg, setting, lay, shapes, rows, notes)


def _fsdp_module() -> Any:
    from vopd_train import fsdp

    return fsdp


# ---------------------------------------------------------------------- what the trainer's open work would change

SYNC_BUCKET_MIB = 512  # the streamed sync's bucket in the projection (issue 21 proposes a --sync-bucket-mb default)


def projections(plan: Plan) -> list[tuple[str, Plan]]:
    """The same plan with the trainer changes issue 21 asks for that the code does not have yet, each applied on top
    of the previous: the LM head sharded like every other layer, then the weight sync streamed in buckets with the
    gradients freed before it. A change the code already has (no replicated parameter, a `sync_bucket_mb` option)
    drops out, so after the merge the plan itself shows what these lines project."""
    out: list[tuple[str, Plan]] = []
    lay, n = plan.layout, plan.setting.gpus
    current = plan
    if lay.replicated_bytes and n > 1:
        saved = lay.replicated_bytes - lay.replicated_bytes // n
        saved_t = lay.replicated_trainable_bytes - lay.replicated_trainable_bytes // n
        full_teacher = not plan.cfg.lora and plan.cfg.teacher in ("ema", "frozen", "trust-region")
        cut = {"weights": saved, "gradients": saved_t, "optimizer (AdamW)": 2 * saved_t,
               "teacher": saved if full_teacher else 0}
        current = _adjusted(current, lambda r, phase, v: v - cut.get(r.name, 0) if phase != "set-up" else v)
        out.append((f"{_names(lay.replicated_names)} sharded", current))
    if plan.cfg.rollout_engine == "vllm" and not getattr(plan.cfg, "sync_bucket_mb", None):
        bucket = SYNC_BUCKET_MIB * 2**20

        def stream(r: Row, phase: str, v: int) -> int:
            if r.name == "weight sync copy":
                return min(v, bucket)
            if r.name == "gradients" and phase in ("weight sync", "rollout"):
                return 0
            return v

        current = _adjusted(current, stream)
        out.append((f"+ sync streamed in {SYNC_BUCKET_MIB} MiB buckets, gradients freed before it", current))
    return out


def _adjusted(plan: Plan, fn: Callable[[Row, str, int], int]) -> Plan:
    rows = [Row(r.name, {p: fn(r, p, v) for p, v in r.phases.items()}, r.how) for r in plan.rows]
    return replace(plan, rows=rows)


# ---------------------------------------------------------------------- what to change


@dataclass(frozen=True)
class Change:
    flag: str
    apply: Callable[[DistillConfig, Setting], list[tuple[DistillConfig, Setting, str]]]


def _halvings(value: int, floor: int) -> list[int]:
    out = []
    while value // 2 >= floor:
        value //= 2
        out.append(value)
    return out


CHANGES: tuple[Change, ...] = (
    Change("--vllm-sleep-mode", lambda c, s: [(replace(c, vllm_sleep_mode=True), s, "--vllm-sleep-mode")]
           if c.rollout_engine == "vllm" and not c.vllm_sleep_mode else []),
    Change("--gradient-checkpointing", lambda c, s: [] if c.gradient_checkpointing else
           [(replace(c, gradient_checkpointing=True), s, "--gradient-checkpointing")]),
    Change("--micro-batch-size", lambda c, s: [(replace(c, micro_batch_size=m), s, f"--micro-batch-size {m}")
                                               for m in _halvings(c.micro_batch_size, c.n_rollouts)]),
    Change("--loss-chunk-size", lambda c, s: [(replace(c, loss_chunk_size=m), s, f"--loss-chunk-size {m}")
                                              for m in _halvings(c.loss_chunk_size, 32)]),
    Change("--vllm-gpu-memory-utilization", lambda c, s: [
        (replace(c, vllm_gpu_memory_utilization=u / 100), s, f"--vllm-gpu-memory-utilization {u / 100:g}")
        for u in range(90, 4, -5) if c.rollout_engine == "vllm" and u / 100 != c.vllm_gpu_memory_utilization]),
    Change("--lora", lambda c, s: [] if c.lora else [(replace(c, lora=True), s, "--lora")]),
    Change("--gpus", lambda c, s: [(c, replace(s, gpus=s.gpus * k), f"--gpus {s.gpus * k}") for k in (2, 4, 8)]),
)


def advise(plan: Plan, model_config: Any, layouts: dict | None = None) -> tuple[list[str], Plan]:
    """The options to change, in the order tried, until the run fits: each change is kept only if it lowers the
    worst phase; within an option the mildest value that fits wins (else the one that helps most)."""
    layouts = layouts if layouts is not None else {}
    current, steps = plan, []
    for change in CHANGES:
        if current.fits:
            break
        candidates = []
        for cfg, setting, text in change.apply(current.cfg, current.setting):
            try:
                cand = plan_memory(current.model, model_config, cfg, setting, layouts)
            except VopdError:
                continue
            candidates.append((cand, text))
        fitting = [c for c in candidates if c[0].fits]
        pick = fitting[0] if fitting else min(candidates, key=lambda c: _badness(c[0]), default=None)
        if pick is not None and _badness(pick[0]) < _badness(current):
            current = pick[0]
            steps.append(pick[1])
    return steps, current


def _badness(plan: Plan) -> tuple[int, int]:
    return (1 if any(n.startswith("does not start") for n in plan.notes) else 0, plan.over)


# ---------------------------------------------------------------------- reading configs, rendering


def load_model_config(model: str, model_config: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's config, from --model-config (a config.json or a folder with one), MODEL itself when it is a
    folder or a config.json, or the local hub cache; never the network when HF_HUB_OFFLINE is set."""
    from transformers import AutoConfig

    source = model_config or model
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".json":
        try:
            import json

            data = json.loads(path.read_text(encoding="utf-8"))
            return AutoConfig.for_model(**data) if "model_type" in data else _bad(path, "no model_type")
        except (ValueError, KeyError, TypeError) as e:
            raise VopdError(f"{path}: not a model config ({' '.join(str(e).split())[:160]})") from None
    if model_config and not path.exists():
        raise VopdError(f"--model-config {model_config}: no such file or folder")
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise VopdError(f"cannot read the config of {source} ({' '.join(str(e).split())[:160]}); "
                        "pass --model-config PATH to a local config.json") from None


def _bad(path: Path, why: str) -> Any:
    raise VopdError(f"{path}: not a model config ({why})")


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _dtype(elem: int) -> str:
    return {4: "float32", 2: "bfloat16"}.get(elem, f"{elem}-byte")


def _names(names: tuple[str, ...]) -> str:
    short = sorted({re.sub(r"^(base_model\.model\.)", "", n).rsplit(".", 1)[0] for n in names})
    return ", ".join(short[:3]) + (" …" if len(short) > 3 else "")


def render(plan: Plan, steps: list[str] | None = None, fixed: Plan | None = None) -> str:
    """The plan as text: one row per memory use, one column per phase, the totals, whether it fits, and what to
    change when it does not."""
    phases = plan.phases()
    s, c = plan.setting, plan.cfg
    out = [f"memory plan: {plan.model} on {s.gpus} GPU{'s' if s.gpus > 1 else ''} of {s.gpu_gib:g} GiB, "
           f"{c.batch_size} prompts × {c.n_rollouts} rollouts per step, {c.max_new_tokens}-token rollouts, prompts "
           f"of {s.prompt_tokens} tokens ({s.image_tokens} image), micro-batch {c.micro_batch_size}, "
           f"{'LoRA' if c.lora else 'full fine-tuning'}, teacher {c.teacher}, rollouts by {c.rollout_engine}"
           + (" (sleep mode)" if c.rollout_engine == "vllm" and c.vllm_sleep_mode else "")
           + (", gradient checkpointing" if c.gradient_checkpointing else ""),
           f"per GPU, GiB (rank 0, the largest shard; {plan.layout.units} FSDP units)"]
    width = max(len(r.name) for r in plan.rows) + 2
    out.append(f"{'':<{width}}" + "".join(f"{p:>13}" for p in phases))
    for r in plan.rows:
        cells = "".join(f"{r.phases[p] / GIB:>13.1f}" if p in r.phases else f"{'–':>13}" for p in phases)
        out.append(f"{r.name:<{width}}{cells}")
    out.append(f"{'peak':<{width}}" + "".join(f"{plan.total(p) / GIB:>13.1f}" for p in phases))
    worst = max(phases, key=plan.total)
    verdict = (f"fits: yes ({plan.total(worst) / GIB:.1f} of {s.gpu_gib:g} GiB at the {worst} peak)" if plan.fits
               else f"fits: no ({worst} needs {plan.total(worst) / GIB:.1f} of {s.gpu_gib:g} GiB)")
    out.append(verdict)
    out.extend(f"note: {n}" for n in plan.notes)
    if not plan.fits:
        if steps:
            out.append(f"first option to change: {steps[0]}")
            if fixed is not None and fixed.fits:
                out.append(f"fits with: {' '.join(steps)} (peak {max(fixed.total(p) for p in fixed.phases()) / GIB:.1f} "
                           "GiB)")
            else:
                out.append(f"still does not fit with: {' '.join(steps)}; more GPUs or a smaller model")
        else:
            out.append("no single option makes it fit: more GPUs or a smaller model")
    for what, proj in projections(plan):
        peaks = ", ".join(f"{p} {proj.total(p) / GIB:.1f}" for p in proj.phases())
        out.append(f"projected, {what}: {peaks} GiB: {'fits' if proj.fits else 'does not fit'}")
    out.append("how each row is counted:")
    out.extend(f"  {r.name}: {r.how}" for r in plan.rows if r.how)
    return "\n".join(out)


__all__ = ["CHANGES", "Layout", "Plan", "Row", "Setting", "Shapes", "activation_bytes", "advise", "build_on_meta",
           "fake_process_group", "layer_bytes_per_token", "load_model_config", "loss_chunk_bytes", "plan_memory",
           "read_layout", "render", "shard_for_plan", "sharded_layout"]
