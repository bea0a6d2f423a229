"""`vopd check MODEL --plan`: the per-GPU memory plan of a distill run, from the model's config alone.

The parameter rows are read from the trainer's own FSDP sharding of a meta-device model under a fake process group;
here they are checked against shard sizes computed by hand from FSDP's rule (the first dimension split in
`torch.chunk` pieces, rank 0 holding the first, the LM head left whole), on a tiny real Qwen3.5.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from tiny_fixtures import tiny_family_dir  # noqa: F401

from vopd_bench.errors import VopdError
from vopd_train.config import DistillConfig
from vopd_train.plan import GIB, Setting, advise, load_model_config, plan_memory, sharded_layout

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
PAPER = ["--batch-size", "96", "--n-rollouts", "8", "--max-new-tokens", "1024", "--rollout-engine", "vllm",
         "--vllm-sleep-mode", "--gradient-checkpointing", "--micro-batch-size", "8"]


def cfg(**kw) -> DistillConfig:
    return DistillConfig(model="m", data="(plan)", out="(plan)", **kw).validate()


@pytest.fixture(scope="module")
def tiny_config(tiny_family_dir):  # noqa: F811
    return load_model_config(str(tiny_family_dir("qwen3.5")))


@pytest.fixture(scope="module")
def untied_config(tiny_config):
    """The tiny Qwen3.5 with its own LM head, as Qwen3.5-9B has."""
    c = type(tiny_config).from_dict(tiny_config.to_dict())
    c.tie_word_embeddings = False
    c.get_text_config().tie_word_embeddings = False
    return c


@pytest.fixture(scope="module")
def deep_config(untied_config):
    """Eight layers instead of two, so that keeping only each layer's input is clearly less than keeping all."""
    c = type(untied_config).from_dict(untied_config.to_dict())
    text = c.get_text_config()
    text.layer_types = list(text.layer_types) * 4
    text.num_hidden_layers = len(text.layer_types)
    return c


def hand_computed(config, world: int, trainable=lambda name: True) -> tuple[int, int, int]:
    """(weights, trainable, replicated) bytes on rank 0, from a real unsharded model: FSDP2 splits each parameter's
    first dimension with torch.chunk (rank 0 gets ceil(d0 / N) rows), the LM head (a unit of its own) included, so
    nothing is replicated."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    weights = train = 0
    for name, p in model.named_parameters():
        rows = p.shape[0] if world == 1 else math.ceil(p.shape[0] / world)
        nbytes = rows * (p.numel() // p.shape[0]) * 4
        weights += nbytes
        train += nbytes if trainable(name) else 0
    return weights, train, 0


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("which", ["tied", "untied"])
def test_parameter_rows_are_the_real_shards(world, which, tiny_config, untied_config):
    config = tiny_config if which == "tied" else untied_config
    weights, trainable, replicated = hand_computed(config, world)
    lay = sharded_layout(config, cfg(), world)
    assert (lay.weight_bytes, lay.trainable_bytes, lay.replicated_bytes) == (weights, trainable, replicated)
    plan = plan_memory("tiny", config, cfg(teacher="ema"), Setting(gpus=world, gpu_gib=80))
    rows = {r.name: r.phases["training"] for r in plan.rows if "training" in r.phases}
    assert rows["weights"] == weights and rows["gradients"] == trainable and rows["teacher"] == weights
    assert rows["optimizer (AdamW)"] == 2 * trainable  # two float32 moments per trainable element


def test_lora_trains_only_the_adapters(untied_config):
    lay = sharded_layout(untied_config, cfg(lora=True), 2)
    weights, trainable = hand_computed_lora(untied_config, 2)
    assert (lay.weight_bytes, lay.trainable_bytes) == (weights, trainable)
    assert 0 < lay.trainable_bytes < lay.weight_bytes / 2 and lay.adapter_bytes == lay.trainable_bytes


def hand_computed_lora(config, world: int) -> tuple[int, int]:
    import torch
    from transformers import AutoModelForImageTextToText

    from vopd_train.trainer import _wrap_lora

    torch.manual_seed(0)
    model = _wrap_lora(AutoModelForImageTextToText.from_config(config), cfg(lora=True))
    weights = train = 0
    for _, p in model.named_parameters():
        rows = math.ceil(p.shape[0] / world)
        nbytes = rows * (p.numel() // p.shape[0]) * 4
        weights += nbytes
        train += nbytes if p.requires_grad else 0
    return weights, train


def test_each_option_moves_the_plan_the_right_way(deep_config):
    untied_config = deep_config
    layouts: dict = {}
    base_cfg = cfg(rollout_engine="vllm", micro_batch_size=16, n_rollouts=4, batch_size=8)
    setting = Setting(gpus=2, gpu_gib=80)

    def row(c, name, phase="training", s=setting):
        plan = plan_memory("tiny", untied_config, c, s, layouts)
        return sum(r.phases.get(phase, 0) for r in plan.rows if r.name == name)

    def total(c, phase="training", s=setting):
        return plan_memory("tiny", untied_config, c, s, layouts).total(phase)

    act = row(base_cfg, "activations")
    # checkpointing switches prefix sharing off today, which on 2 layers costs more than it saves: compare unshared
    plain = replace(base_cfg, prefix_sharing=False)
    assert row(replace(plain, gradient_checkpointing=True), "activations") < row(plain, "activations") / 2
    assert row(plain, "activations") > act  # each response with its own copy of the prompt
    assert row(replace(base_cfg, micro_batch_size=8), "activations") < act
    assert row(replace(base_cfg, max_new_tokens=2048), "activations") > act
    assert row(replace(base_cfg, loss_chunk_size=64), "loss chunk") < row(base_cfg, "loss chunk")
    assert total(replace(base_cfg, vllm_sleep_mode=True)) < total(base_cfg)
    for engine in ("engine weights (vLLM, bf16)", "engine working memory (vLLM)", "engine KV cache (vLLM)"):
        assert row(base_cfg, engine) > 0 and row(replace(base_cfg, vllm_sleep_mode=True), engine) == 0
        assert row(replace(base_cfg, vllm_sleep_mode=True), engine, "rollout") == row(base_cfg, engine, "rollout")
    kv = "engine KV cache (vLLM)"
    assert row(replace(base_cfg, vllm_gpu_memory_utilization=0.3), kv, "rollout") < row(base_cfg, kv, "rollout")
    assert row(replace(base_cfg, lora=True), "gradients") < row(base_cfg, "gradients")
    assert row(replace(base_cfg, lora=True), "optimizer (AdamW)") < row(base_cfg, "optimizer (AdamW)")
    assert row(base_cfg, "weights", s=replace(setting, gpus=8)) < row(base_cfg, "weights")
    assert row(base_cfg, "teacher") > 0 and row(replace(base_cfg, teacher="current"), "teacher") == 0
    hf = replace(base_cfg, rollout_engine="hf")
    cache = "rollout cache (transformers generate)"
    assert row(replace(hf, n_rollouts=8), cache, "rollout") > row(hf, cache, "rollout")
    assert row(base_cfg, "weight sync copy", "weight sync") > row(replace(base_cfg, lora=True), "weight sync copy",
                                                                  "weight sync")


def test_the_first_option_to_change_is_the_one_that_makes_it_fit(deep_config):
    """A GPU just big enough for the run with gradient checkpointing: the plan says no, names that option, and with
    it the plan says yes."""
    layouts: dict = {}
    base = cfg(micro_batch_size=16, n_rollouts=4, batch_size=8, prefix_sharing=False)
    needed = plan_memory("tiny", deep_config, replace(base, gradient_checkpointing=True), Setting(2, 80), layouts)
    gib = max(needed.total(p) for p in needed.phases()) / GIB * 1.001
    plan = plan_memory("tiny", deep_config, base, Setting(2, gib), layouts)
    assert not plan.fits
    steps, fixed = advise(plan, deep_config, layouts)
    assert steps[0] == "--gradient-checkpointing" and fixed.fits


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from vopd_bench import cli

    monkeypatch.setattr(sys, "argv", ["vopd", "check", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.mark.parametrize("args, message", [
    (["--plan", "--gpus", "0", "--gpu-memory", "80"], "--gpus must be ≥ 1"),
    (["--plan", "--gpu-memory", "80", "--micro-batch-size", "0"], "--micro_batch_size must be ≥ 1"),
    (["--plan", "--gpus", "8"], "--plan needs --gpu-memory"),
    (["--gpus", "8"], "--gpus only applies with --plan"),
    (["--plan", "--gpu-memory", "80", "--model-config", "/nowhere/config.json"], "no such file"),
])
def test_a_bad_option_is_one_line(args, message, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, str(CONFIGS / "qwen3_5_9b.json"), *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and message.replace("_", "-") in \
        lines[0].replace("_", "-"), err


def test_the_paper_setting_plans_offline_from_the_committed_config(monkeypatch, capsys):
    """Qwen3.5-9B on 8 × 80 GiB, 96 prompts × 8 rollouts per step: the config builds the published model to the
    parameter, and with --lora the run fits today (full fine-tuning waits on the trainer's open work, which the
    plan projects)."""
    code, out, _ = run_cli(monkeypatch, capsys, "Qwen/Qwen3.5-9B", "--plan", "--gpus", "8", "--gpu-memory", "80",
                           "--model-config", str(CONFIGS / "qwen3_5_9b.json"), *PAPER, "--lora")
    assert code in (0, None) and "fits: yes" in out, out
    # the hub reports 9,653,104,368 parameters for Qwen/Qwen3.5-9B at revision c202236 (its safetensors total); the
    # config must build exactly that less the multi-token-prediction block, which transformers does not build
    text = json.loads((CONFIGS / "qwen3_5_9b.json").read_text())["text_config"]
    h, i, hd = text["hidden_size"], text["intermediate_size"], text["head_dim"]
    q, kv = text["num_attention_heads"] * hd, text["num_key_value_heads"] * hd
    mtp_layer = (2 * q + 2 * kv + q) * h + 2 * hd + 3 * h * i + 2 * h  # gated q, k, v, o; q/k norms; MLP; 2 norms
    mtp = 2 * h * h + 3 * h + mtp_layer  # fc over [embedding; hidden], its two input norms and the final norm
    built = 9_653_104_368 - mtp
    assert f"engine weights (vLLM, bf16): {built:,} parameters" in out
    for row in ("weights", "gradients", "optimizer (AdamW)", "teacher", "activations", "loss chunk",
                "engine KV cache (vLLM)", "engine weights (vLLM, bf16)"):
        assert f"\n{row} " in out


def test_a_config_json_without_a_model_type_is_refused(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(VopdError, match="not a model config"):
        load_model_config("x", str(bad))


def test_the_weight_sync_copy_is_one_bucket_of_whole_groups(untied_config):
    """--sync-bucket-mb: the sync holds one bucket in the engine's dtype (bf16), made of whole groups (a module's
    parent's weights, which vLLM fuses), so a group larger than the bucket goes alone; never more than the whole
    model. Gradients are freed before the sync. Hand-computed from the real unsharded model."""
    from collections import Counter

    import torch
    from transformers import AutoModelForImageTextToText

    from vopd_train.plan import projections

    torch.manual_seed(0)
    groups: Counter = Counter()
    for name, p in AutoModelForImageTextToText.from_config(untied_config).named_parameters():
        groups[".".join(name.split(".")[:-2])] += p.numel()
    whole, largest = 2 * sum(groups.values()), 2 * max(groups.values())
    assert largest < whole

    def sync_row(bucket_mb: float) -> dict:
        plan = plan_memory("tiny", untied_config, cfg(rollout_engine="vllm", sync_bucket_mb=bucket_mb),
                           Setting(2, 80))
        return {r.name: r.phases for r in plan.rows}

    rows = sync_row(64)  # the tiny model is smaller than one bucket
    assert rows["weight sync copy"]["weight sync"] == whole
    assert rows["gradients"]["weight sync"] == rows["gradients"]["rollout"] == 0 < rows["gradients"]["training"]
    assert sync_row(1e-4)["weight sync copy"]["weight sync"] == largest  # 104 bytes: the largest group alone
    mid = (largest + whole) / 2 / 2**20
    assert sync_row(mid)["weight sync copy"]["weight sync"] == int(mid * 2**20) // 2 * 2
    plan = plan_memory("tiny", untied_config, cfg(rollout_engine="vllm"), Setting(2, 80))
    assert not any("sync streamed" in what for what, _ in projections(plan))


def test_a_tensor_parallel_engine_holds_a_share_of_its_weights_on_each_gpu(untied_config):
    """--vllm-tensor-parallel-size K: one engine over K GPUs holds 1/K of its bf16 weights on each, and the share
    the weights leave goes to the KV cache. Hand-computed from the real unsharded model's parameter count; K must
    divide the GPUs."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    params = sum(p.numel() for p in AutoModelForImageTextToText.from_config(untied_config).parameters())
    share = int(0.5 * 80 * GIB)

    def rows(k: int, gpus: int = 4) -> dict:
        plan = plan_memory("tiny", untied_config, cfg(rollout_engine="vllm", vllm_tensor_parallel_size=k),
                           Setting(gpus, 80))
        return {r.name: r.phases for r in plan.rows}

    for k in (1, 2, 4):
        got = rows(k)
        assert got["engine weights (vLLM, bf16)"]["rollout"] == params * 2 // k
        assert got["engine KV cache (vLLM)"]["rollout"] == share - params * 2 // k - 2 * GIB
    with pytest.raises(VopdError, match="must divide the number of GPUs"):
        rows(3)
    with pytest.raises(VopdError, match="≥ 1"):
        cfg(vllm_tensor_parallel_size=0)
