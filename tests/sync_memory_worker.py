"""Run by torchrun from test_weight_sync.py: one rank's memory during one weight sync of a ~115M-parameter model.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/sync_memory_worker.py BUCKET_MB OUT_JSON \
        [LORA_MODEL_DIR]

Two syncs are measured: one in buckets of BUCKET_MB, then the control, one bucket holding the whole model (what a
sync that gathers everything at once costs), so the test can tell the two apart. With LORA_MODEL_DIR, a LoRA
model (adapters on the query projections, the vision MLPs' first layers and the gate projections) is also
exported sharded and whole in one process: the merged weights must be identical.

The model is a Qwen2-VL whose language model is 7 layers of width 1024, sharded with FSDP2 over the ranks (float32
master weights). The engine is a stand-in that keeps its own bfloat16 copy of every weight (allocated before the
measurement, as a real engine's weights are) and copies each bucket into it, as vLLM's in-place reload does. The
sync is the trainer's: `weight_sync.stream_into`, which casts each shard to bfloat16, gathers it and hands the
bucket over. Memory is the process's resident set (VmRSS); its high-water mark (VmHWM) is reset just before the
sync (`/proc/self/clear_refs`), so the peak is the sync's own. glibc's malloc is told to map every block of
64 KiB or more on its own (MALLOC_MMAP_THRESHOLD_, set by the test), so freed tensors go back to the kernel and
the resident set follows the live tensors.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def build_model():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=7, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=8192, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e4},
                         tie_word_embeddings=True),
        vision_config=dict(depth=1, embed_dim=64, hidden_size=1024, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=8000, video_token_id=8001, vision_start_token_id=8002, vision_end_token_id=8003,
        vocab_size=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config)


def lora_model(path: str):
    from peft import LoraConfig, get_peft_model

    from vopd_bench.modeling import load_model

    model, _ = load_model(path, device="cpu", dtype="float32")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1", "gate_proj"]))
    with torch.no_grad():  # B starts at zero: give the adapters something to merge
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft_model


def main(bucket_mb: float, out: str, lora_dir: str | None = None) -> None:
    from vopd_bench import distributed
    from vopd_train import fsdp, weight_sync

    place = distributed.init()
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    fsdp.shard_model(model, "cpu")
    engine: dict[str, torch.Tensor] = {}
    for name, t in weight_sync.export_weights(model, torch.bfloat16).items():  # the engine's own copy
        engine[name] = t.clone()
    gc.collect()
    received: list[int] = []

    def load(pairs):
        for name, t in pairs:
            engine[name].copy_(t)
        received.append(sum(t.numel() * t.element_size() for _, t in pairs))

    with torch.no_grad():  # new weights, so that the engine's copy has to change
        for p in model.parameters():
            p.to_local().add_(1.0) if hasattr(p, "to_local") else p.add_(1.0)
    result = {"rank": place.rank, "world_size": place.world_size, "parameters": n_params}
    for label, size in (("bucketed", bucket_mb * 2**20), ("whole", 2**62)):
        gc.collect()
        distributed.barrier()
        steady = status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        stats = weight_sync.stream_into(load, model, dtype=torch.bfloat16, bucket_bytes=int(size),
                                        world_size=place.world_size)
        peak = status_kib("VmHWM")
        result[label] = {"steady_mib": steady / 1024, "extra_mib": (peak - steady) / 1024, "buckets": stats.buckets,
                         "largest_bucket_mib": stats.largest_bucket / 2**20, "sent_mib": stats.bytes / 2**20}
    distributed.barrier()
    # the engine got every weight, whole and right: its copy equals the gathered model's
    full = weight_sync.export_weights(model, torch.bfloat16)
    result["exact"] = full.keys() == engine.keys() and all(torch.equal(engine[k], v) for k, v in full.items())
    result["model_bf16_mib"] = sum(v.numel() * 2 for v in full.values()) / 2**20
    if lora_dir:
        del model, engine, full
        gc.collect()
        sharded, whole = lora_model(lora_dir), lora_model(lora_dir)
        fsdp.shard_model(sharded, "cpu")
        got, want = weight_sync.export_weights(sharded), weight_sync.export_weights(whole)
        result["lora_tensors"] = len(want)
        result["lora_exact"] = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    Path(out.replace(".json", f"-{place.rank}.json")).write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
