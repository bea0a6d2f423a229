"""One rank of tests/real_vllm/test_real_torchrun.py: the trainer under torchrun with a real vLLM engine per rank.

    torchrun --nproc-per-node 2 tests/real_vllm/torchrun_driver.py MODEL_DIR OUT_DIR

Trains two steps (FSDP over the ranks, a weight sync in several buckets after each), recording per rank: the
engine's process and the prompts every rollout call got (each rank must sample its own share, from its own
engine), the importance weights, and after every sync whether the engine's greedy answers equal transformers'
on the trainer's current weights (gathered whole from the shards on every rank). Writes OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from engine_checks import hf_greedy, vllm_greedy  # noqa: E402

from vopd_bench import distributed  # noqa: E402
from vopd_train.config import DistillConfig  # noqa: E402
from vopd_train.trainer import Distiller  # noqa: E402


def main(model_dir: str, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from vopd_bench.modeling import load_model

    cfg = DistillConfig(model=model_dir, data="synthetic:train", out=f"{out}/run", steps=2, batch_size=4,
                        n_rollouts=2, max_new_tokens=8, micro_batch_size=8, lr=5e-3, warmup_steps=0, topk=20,
                        seed=0, importance_weight=True, rollout_engine="vllm", vllm_gpu_memory_utilization=0.02,
                        vllm_eager=True, sync_bucket_mb=0.1, remeasure=False, quiet=True, threads=1)
    d = Distiller(cfg)
    rank = d.place.rank
    record: dict = {"rank": rank, "pid": os.getpid(), "engine": id(d.engine.llm), "calls": [], "steps": []}
    generate = d.engine.generate

    def recording(prompts, settings):
        record["calls"].append([fingerprint(p) for p in prompts])
        return generate(prompts, settings)

    d.engine.generate = recording
    probes, _ = d._render(list(range(4)))  # the same four prompts on every rank
    reference, _ = load_model(model_dir, device="cpu", dtype="float32")  # a whole copy for transformers' answers
    for k in range(2):
        mine = [fingerprint(p) for p in d._render(d._rank_share(d._batch_indices(k)))[0]]
        stats = d.train_step(k)
        full = get_model_state_dict(d.model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        reference.load_state_dict(full, strict=False)
        agree = vllm_greedy(d.engine, probes) == hf_greedy(reference, d.processor, d.engine, probes)
        record["steps"].append({"is_weight": stats.is_weight, "engine_agrees": agree, "own_share": mine,
                                "sync_buckets": d.engine.last_sync.buckets, "sync_bytes": d.engine.last_sync.bytes})
    d.engine.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    distributed.shutdown()


def fingerprint(prompt) -> str:
    """A prompt's text and image pixels, hashed."""
    return hashlib.sha256(prompt.text.encode() + prompt.image.tobytes()).hexdigest()[:16]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
