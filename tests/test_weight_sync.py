"""`vopd_train.weight_sync`: what a sync into vLLM sends, in which buckets, and the memory one sync costs.

The memory test runs the trainer's own gather, cast and bucket code on a 115M-parameter model sharded over two
gloo ranks, with an engine stand-in that copies each bucket into its own bfloat16 copy (as vLLM's in-place
reload does); tests/real_vllm/ runs the same code into real engines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vopd_bench.modeling import load_model
from vopd_train import weight_sync

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(__file__).with_name("sync_memory_worker.py")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")[0]


def test_groups_are_whole_modules_and_buckets_never_split_one(tiny, tiny_model_dir):
    groups = weight_sync.sync_groups(tiny)
    names = [e.name for g in groups for e in g.entries]
    assert len(names) == len(set(names))  # every weight once; the tied LM head not at all
    assert not any(n.startswith("lm_head") for n in names)
    attention = next(g for g in groups if g.key == "model.language_model.layers.0.self_attn")
    assert sorted(e.name.rsplit(".", 2)[1] for e in attention.entries) == ["k_proj", "k_proj", "o_proj", "q_proj",
                                                                           "q_proj", "v_proj", "v_proj"]
    for bucket_bytes in (1, 50_000, 200_000, 10**9):
        packed = weight_sync.buckets(groups, torch.bfloat16, bucket_bytes, world_size=2)
        assert [g for b in packed for g in b] == groups  # whole groups, in order
        for b in packed:
            full = [e.full_bytes(torch.bfloat16) for g in b for e in g.entries]
            # within the bound (gathered bytes plus one shard being gathered), unless one group alone exceeds it
            assert sum(full) + max(full) // 2 <= bucket_bytes or len(b) == 1
    assert len(weight_sync.buckets(groups, torch.bfloat16, 10**9)) == 1
    # the checkpoint's names, as save_pretrained writes them
    assert set(weight_sync.export_weights(tiny)) == set(load_file(tiny_model_dir / "model.safetensors"))


def test_a_bucketed_sync_sends_what_a_whole_one_does_in_the_engines_dtype(tiny):
    whole = weight_sync.export_weights(tiny, torch.bfloat16)
    got: dict[str, torch.Tensor] = {}
    calls = []

    def load(pairs):
        calls.append(len(pairs))
        for name, t in pairs:
            assert name not in got
            got[name] = t.clone()

    stats = weight_sync.stream_into(load, tiny, dtype=torch.bfloat16, bucket_bytes=100_000)
    assert len(calls) == stats.buckets > 3 and stats.tensors == len(whole) == sum(calls)
    assert got.keys() == whole.keys() and all(torch.equal(got[k], whole[k]) for k in whole)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert stats.bytes == sum(t.numel() * 2 for t in whole.values())
    # in the parameters' own dtype and one process, the tensors are the live parameters, never copies
    same = weight_sync.export_weights(tiny)
    assert same["model.embed_tokens.weight"].data_ptr() == tiny.model.language_model.embed_tokens.weight.data_ptr()


def test_lora_sends_the_groups_of_the_adapted_layers_only(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    keys = [g.key for g in weight_sync.sync_groups(peft_model)]
    assert keys == ["model.language_model.layers.0.self_attn", "model.language_model.layers.1.self_attn"]


def test_one_sync_costs_at_most_one_bucket_above_the_steady_state(tmp_path, tiny_model_dir):
    """FSDP over two ranks, 115M parameters (220 MiB in bfloat16): a sync in 48 MiB buckets may raise a rank's
    resident memory by at most 48 MiB; the control, the whole model in one bucket, raises it by about the model
    (so the measurement does see a sync that gathers everything at once). In the same job, LoRA layers merged
    from FSDP shards equal those merged in one process."""
    bucket_mb = 48
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(WORKER), str(bucket_mb), str(out), str(tiny_model_dir)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"memory-{rank}.json").read_text())
        assert r["parameters"] > 100e6 and r["exact"]
        assert r["lora_exact"] and r["lora_tensors"] > 6
        bucketed, whole = r["bucketed"], r["whole"]
        print(f"rank {rank}: steady {bucketed['steady_mib']:.0f} MiB, one sync +{bucketed['extra_mib']:.1f} MiB in "
              f"{bucketed['buckets']} buckets of at most {bucketed['largest_bucket_mib']:.1f} MiB; the whole model "
              f"at once +{whole['extra_mib']:.1f} MiB (model {r['model_bf16_mib']:.0f} MiB in bfloat16)")
        assert bucketed["buckets"] > 3 and bucketed["largest_bucket_mib"] <= bucket_mb
        assert bucketed["extra_mib"] <= bucket_mb
        assert whole["extra_mib"] >= 0.9 * r["model_bf16_mib"]
