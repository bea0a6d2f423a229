"""Prefix sharing in the distill step: wall time and peak memory of one micro-batch, sharing off vs on.

Setup (issue 11): a random-initialised Qwen2.5-VL-class model — the real architecture (M-RoPE, GQA, SwiGLU,
windowed vision tower) at a CPU-feasible width — one prompt whose image gives about 1,000 prefix tokens, n = 8
responses of 48 tokens, with LoRA and with full fine-tuning. Measured: the teacher forward (no gradient) plus the
student forward, the per-token divergence and the backward, exactly as `Distiller._backward_micro` runs them.

Each variant runs in a fresh subprocess with the same seed (same weights, same tokens), on one CPU thread: memory =
growth of the process's peak resident memory (VmHWM) over its resident memory just before the first step; time =
the CPU time of the second step (the speedup uses CPU time because the shared machine's wall time is noisy; wall
time is printed too). The children's per-token losses are compared.

    .venv/bin/python benchmarks/prefix_sharing.py [--prefix 1000] [--n 8] [--response 48] [--hidden 512] [--heads 8]
        [--layers 2] [--vocab 4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(args):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    head_dim = args.hidden // args.heads
    pairs = head_dim // 2  # rotary pairs, split (temporal, height, width) about 2:3:3, as Qwen's 16:24:24
    t, h = pairs * 2 // 8, pairs * 3 // 8
    rope = {"rope_type": "default", "mrope_section": [t, h, pairs - t - h],
            "rope_theta": 1e6}
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=args.hidden, intermediate_size=int(args.hidden * 5.375) // 8 * 8,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=2,
                         vocab_size=args.vocab, max_position_embeddings=32768, rope_parameters=rope,
                         tie_word_embeddings=True),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=args.hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=args.vocab - 1, video_token_id=args.vocab - 2, vision_start_token_id=args.vocab - 3,
        vision_end_token_id=args.vocab - 4, tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model, config


def prompt(args, config, seed: int):
    """One prompt of about `args.prefix` tokens: a few text tokens, the image's tokens, the question."""
    import torch

    from vopd_train.rollout import EncodedPrompt

    side = int((args.prefix * 4) ** 0.5) // 2 * 2  # patches per side; 4 patches merge into one token
    grid = torch.tensor([[1, side, side]])
    n_image = side * side // 4
    text = args.prefix - n_image - 2
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([config.vision_start_token_id]),
                     torch.full((n_image,), config.image_token_id), torch.tensor([config.vision_end_token_id]),
                     torch.randint(0, args.vocab - 8, (text,), generator=gen)])
    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": (ids == config.image_token_id).long()}
    pixels = torch.randn(side * side, 3 * 2 * 14 * 14, generator=gen)
    return EncodedPrompt(tokens, {"pixel_values": pixels, "image_grid_thw": grid}, "", None)


def batches(args, config):
    """The student's and the teacher's sequences; the teacher's image (the crop) has the same token count here,
    as a 2× zoomed crop often does."""
    import torch

    from vopd_train.rollout import build_sequences

    g = torch.Generator().manual_seed(1)
    responses = [torch.randint(0, args.vocab - 8, (args.response,), generator=g).tolist() for _ in range(args.n)]
    owner = [0] * args.n
    return (build_sequences([prompt(args, config, 2)], responses, owner, 0),
            build_sequences([prompt(args, config, 3)], responses, owner, 0))


def peak_kib() -> int:
    return _status("VmHWM")


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args) -> None:
    import time

    import torch

    from vopd_train.losses import chunked_divergence
    from vopd_train.prefix import scored_hidden
    from vopd_train.rollout import head_fn

    torch.set_num_threads(args.threads)
    model, config = build(args)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    student, teacher = batches(args, config)
    share = args.share

    def step():
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            t_hidden = scored_hidden(model, teacher, share)
        s_hidden = scored_hidden(model, student, share)
        out = chunked_divergence(s_hidden, t_hidden, head_fn(model), head_fn(model), student.targets, alpha=0.5,
                                 topk=100, add_tail=True, objective="logits", temperature=1.0,
                                 trust_region_rate=None, chunk_size=256)
        out.loss.sum().backward()
        return out.loss.detach()

    # memory: the first step in a fresh process (no allocator pools yet to hide its growth)
    before = _status("VmRSS")
    step()
    peak = peak_kib() - before
    # time: the second step; CPU time of this process (the shared CI machine makes wall time noisy), wall too
    t, c = time.perf_counter(), time.process_time()
    loss = step()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    json.dump({"seconds": cpu, "wall": wall, "peak_mib": peak / 1024, "loss": loss.tolist()},
              open(args.child_out, "w"))


def model_arguments() -> argparse.ArgumentParser:
    """The options `build` and `prompt` read (model shape, prefix length, n, threads): shared with the rollout
    benchmark, which measures the same model and prompt."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, default=1000)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    return ap


def main() -> None:
    ap = model_arguments()
    ap.add_argument("--response", type=int, default=48)
    ap.add_argument("--child-out")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--share", action="store_true")
    args = ap.parse_args()
    if args.child_out:
        return child(args)

    common = [f"--{k}={getattr(args, k)}" for k in ("prefix", "n", "response", "hidden", "heads", "layers", "vocab",
                                                    "threads")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("full", "lora"):
            for share in (False, True):
                out = os.path.join(tmp, f"{mode}-{share}.json")
                cmd = [sys.executable, __file__, *common, f"--child-out={out}"]
                cmd += ["--lora"] * (mode == "lora") + ["--share"] * share
                subprocess.run(cmd, check=True)
                results[mode, share] = json.load(open(out))
    p, r, n = args.prefix, args.response, args.n
    bound = (2 * n * (p + r)) / (2 * (p + n * r))
    print(f"Qwen2.5-VL-class, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.threads} threads; "
          f"prefix {p}, n {n}, response {r}: token bound {bound:.2f}x")
    speedups, mems, diffs = [], [], []
    for mode in ("full", "lora"):
        off, on = results[mode, False], results[mode, True]
        import torch

        diff = float((torch.tensor(off["loss"]) - torch.tensor(on["loss"])).abs().max())
        speedups.append(off["seconds"] / on["seconds"])
        mems.append(on["peak_mib"] / off["peak_mib"])
        diffs.append(diff)
        print(f"{mode:5s} off {off['seconds']:7.2f} s CPU ({off['wall']:.2f} s wall) {off['peak_mib']:6.0f} MiB | "
              f"on {on['seconds']:7.2f} s CPU ({on['wall']:.2f} s wall) "
              f"{on['peak_mib']:8.0f} MiB | speedup {speedups[-1]:.2f}x, memory {mems[-1]:.2f}, "
              f"max loss diff {diff:.1e}")
    # the last line: the worse of the two modes on every figure
    print(f"speedup: {min(speedups):.2f}  peak-memory ratio: {max(mems):.2f}  max-loss-diff: {max(diffs):.1e}")


if __name__ == "__main__":
    main()
