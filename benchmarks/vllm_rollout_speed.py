"""Rollout tokens/s: vLLM's engine (`VLLMRolloutEngine`) against transformers `generate` (`HFRolloutEngine`, the
trainer's default engine, prompt prefills shared) on the same model, prompts and sampling settings, in one run.
Runs on a GPU (bfloat16) or, with vLLM's CPU release, on a CPU (float32). Part of benchmarks/vllm_gpu_check.sh.

    python benchmarks/vllm_rollout_speed.py MODEL_DIR [--prompts 16] [--n 4] [--max-new-tokens 32]
    python benchmarks/vllm_rollout_speed.py --build tiny DIR ...     (builds the vLLM-runnable tiny Qwen2-VL first)
    python benchmarks/vllm_rollout_speed.py --build medium DIR ...   (a random ~110M-parameter Qwen2-VL: width 1024,
                                                                     8 layers, head size 128, the tiny tokenizer)

Each engine gets one warm-up call, then `--repeats` timed calls (the best is kept: the machine may be shared);
tokens are the sampled response tokens (EOS included). Prints one JSON line: the device, dtype, load average,
tokens, seconds and tokens/s per engine, and the ratio vLLM / HF.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from PIL import Image

from vopd_bench.modeling import load_model
from vopd_train.rollout import HFRolloutEngine, SamplingSettings, encode_prompts
from vopd_train.rollout_vllm import VLLMRolloutEngine


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(engine, prompts, settings, repeats: int) -> dict:
    engine.generate(prompts[:2], settings)  # warm-up (compilation, graphs, caches)
    best = None
    for _ in range(repeats):
        torch.manual_seed(0)
        _sync()
        start = time.perf_counter()
        rollouts = engine.generate(prompts, settings)
        _sync()
        seconds = time.perf_counter() - start
        tokens = sum(len(r.token_ids) for r in rollouts)
        if best is None or tokens / seconds > best["tokens_per_s"]:
            best = {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
    return best


def build(size: str, out: str) -> str:
    from vopd_bench.tiny.families import build_tiny
    from vopd_bench.tiny.vllm_runnable import build_vllm_tiny

    if size == "tiny":
        return str(build_vllm_tiny("qwen2-vl", out))

    def medium(config) -> None:
        text = config.get_text_config()
        text.hidden_size, text.intermediate_size, text.num_hidden_layers = 1024, 4096, 8
        text.layer_types = ["full_attention"] * 8
        text.num_attention_heads, text.num_key_value_heads = 8, 2
        text.rope_parameters["mrope_section"] = [16, 24, 24]  # head size 128: 64 rotary pairs
        config.vision_config.hidden_size = 1024  # the merger projects into the language model's width
        for sub in (config, text, config.vision_config):
            sub.initializer_range = 0.02

    return str(build_tiny("qwen2-vl", out, adjust_config=medium))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--build", nargs=2, metavar=("SIZE", "DIR"), help="build a checkpoint (tiny or medium) and use it")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                    help="vLLM's share: of the GPU, or on a CPU of the host's available memory")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for transformers on a CPU")
    args = ap.parse_args()
    model_dir = args.model
    if args.build:
        model_dir = build(*args.build)
    if not model_dir:
        ap.error("MODEL_DIR or --build SIZE DIR")
    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_model(model_dir, device="cuda" if cuda else "cpu", dtype=dtype)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    images = [Image.new("RGB", (224, 224), colours[i % 4]) for i in range(args.prompts)]
    prompts = encode_prompts(processor, images, [f"Describe the image, number {i}." for i in range(args.prompts)])
    settings = SamplingSettings(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens)
    eos = model.generation_config.eos_token_id
    hf = timed(HFRolloutEngine(model, processor), prompts, settings, args.repeats)
    vllm_engine = VLLMRolloutEngine(model_dir, processor, gpu_memory_utilization=args.gpu_memory_utilization,
                                    dtype=dtype, eos_token_ids=eos if isinstance(eos, list) else [eos],
                                    config=model.config)
    vllm = timed(vllm_engine, prompts, settings, args.repeats)
    vllm_engine.close()
    device = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores"
    print(json.dumps({"device": device, "dtype": dtype, "load_average": os.getloadavg(),
                      "parameters": sum(p.numel() for p in model.parameters()), "prompts": args.prompts,
                      "n": args.n, "max_new_tokens": args.max_new_tokens, "hf": hf, "vllm": vllm,
                      "vllm_over_hf": round(vllm["tokens_per_s"] / hf["tokens_per_s"], 2)}))


if __name__ == "__main__":
    main()
