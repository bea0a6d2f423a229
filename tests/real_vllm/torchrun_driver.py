"""One rank of tests/real_vllm/test_real_torchrun.py: the trainer under torchrun with a real vLLM engine per rank.

    torchrun --nproc-per-node 2 tests/real_vllm/torchrun_driver.py MODEL_DIR OUT_DIR [TENSOR_PARALLEL_SIZE]

Trains two steps (FSDP over the ranks, a weight sync in several buckets after each), recording per rank: the
engine's process and the prompts every rollout call got (each rank must sample its own share, from its own
engine), the importance weights, and after every sync whether the engine's greedy answers equal transformers'
on the trainer's current weights (gathered whole from the shards on every rank). Writes OUT_DIR/rank<r>.json.
With a tensor parallel size K > 1 (one engine over each K ranks), before training each rank also samples its own
two of the four probe prompts with fixed seeds and records the rollouts it keeps (`own_rollouts`); rank 0 saves
the probes (OUT_DIR/probes.pkl) for the test to sample them with a K = 1 engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from engine_checks import hf_greedy, vllm_greedy  # noqa: E402

from vopd_bench import distributed  # noqa: E402
from vopd_train.config import DistillConfig  # noqa: E402
from vopd_train.trainer import Distiller  # noqa: E402

PROBE_SEEDS = (11, 12_345, 777, 4_242)


def main(model_dir: str, out: str, tp: int = 1) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from vopd_bench.modeling import load_model

    cfg = DistillConfig(model=model_dir, data="synthetic:train", out=f"{out}/run", steps=2, batch_size=4,
                        n_rollouts=2, max_new_tokens=8, micro_batch_size=8, lr=5e-3, warmup_steps=0, topk=20,
                        seed=0, importance_weight=True, rollout_engine="vllm", vllm_gpu_memory_utilization=0.02,
                        vllm_eager=True, sync_bucket_mb=0.1, remeasure=False, quiet=True, threads=1,
                        vllm_tensor_parallel_size=tp)
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
    if tp > 1:  # the checkpoint's weights: each rank its own two probes, at the trainer's temperature
        mine = slice(2 * rank, 2 * rank + 2)
        settings = replace(d.sampling, prompt_seeds=PROBE_SEEDS[mine])
        record["own_rollouts"] = [asdict(r) for r in generate(probes[mine], settings)]
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        record["tp"] = [get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()]
        if rank == 0:
            Path(out, "probes.pkl").write_bytes(pickle.dumps((probes, d.sampling)))
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
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
