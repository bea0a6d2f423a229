"""Rollout tokens/s: vLLM's engine (`VLLMRolloutEngine`) against transformers `generate` (`HFRolloutEngine`) on
the same model, prompts and sampling settings, on one GPU. Part of benchmarks/vllm_gpu_check.sh.

    python benchmarks/vllm_rollout_speed.py MODEL_DIR [--prompts 32] [--n 4] [--max-new-tokens 64]

Each engine gets one warm-up call, then one timed call; tokens are the sampled response tokens (EOS included).
Prints one JSON line: tokens, seconds and tokens/s per engine, and the ratio vLLM / HF.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image

from vopd_bench.modeling import load_model
from vopd_train.rollout import HFRolloutEngine, SamplingSettings, encode_prompts
from vopd_train.rollout_vllm import VLLMRolloutEngine


def timed(engine, prompts, settings) -> dict:
    engine.generate(prompts[:2], settings)  # warm-up (compilation, CUDA graphs, caches)
    torch.cuda.synchronize()
    start = time.perf_counter()
    rollouts = engine.generate(prompts, settings)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in rollouts)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    args = ap.parse_args()
    model, processor = load_model(args.model, device="cuda", dtype="bfloat16")
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    images = [Image.new("RGB", (224, 224), colours[i % 4]) for i in range(args.prompts)]
    prompts = encode_prompts(processor, images, [f"Describe the image, number {i}." for i in range(args.prompts)])
    settings = SamplingSettings(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens)
    eos = model.generation_config.eos_token_id
    torch.manual_seed(0)
    hf = timed(HFRolloutEngine(model, processor), prompts, settings)
    vllm_engine = VLLMRolloutEngine(args.model, processor, gpu_memory_utilization=args.gpu_memory_utilization,
                                    dtype="bfloat16", eos_token_ids=eos if isinstance(eos, list) else [eos],
                                    config=model.config)
    vllm = timed(vllm_engine, prompts, settings)
    print(json.dumps({"device": torch.cuda.get_device_name(), "prompts": args.prompts, "n": args.n,
                      "max_new_tokens": args.max_new_tokens, "hf": hf, "vllm": vllm,
                      "vllm_over_hf": round(vllm["tokens_per_s"] / hf["tokens_per_s"], 2)}))


if __name__ == "__main__":
    main()
