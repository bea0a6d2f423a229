"""Prefix sharing in HF rollouts: each prompt prefilled once for its n samples vs once per sample.

Setup (issue 11, What item 2): the model and prompt of `benchmarks/prefix_sharing.py` (a random-initialised
Qwen2.5-VL-class model, one prompt of about 1,000 tokens, mostly image), n = 8 samples of 48 new tokens each,
drawn by `HFRolloutEngine.generate` with per-row seeds, with `prefix_sharing` on and off. Both paths pass the image
through the vision tower once (the plain path through its vision-once route), so the difference is the language
model's prefill: one 1,000-token row against eight.

One process, one CPU thread: a warm-up call of each path, then `--repeats` alternating timed calls; the figure is
the ratio of the median CPU times (the shared machine's wall time is noisy; wall time is printed too). The two
paths' samples are compared token for token.

    .venv/bin/python benchmarks/prefix_sharing_rollout.py [--prefix 1000] [--n 8] [--new 48] [--repeats 3]
        [--hidden 512] [--heads 8] [--layers 2] [--vocab 4096] [--threads 1]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    from prefix_sharing import build, model_arguments, prompt

    ap = model_arguments()
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from vopd_train import rollout
    from vopd_train.rollout import HFRolloutEngine, SamplingSettings

    torch.set_num_threads(args.threads)
    model, config = build(args)
    # The random model has no processor: the engine's tokenizer ids and banned ids come from the config instead.
    rollout.vision_token_ids = lambda processor, cfg: [cfg.image_token_id, cfg.video_token_id,
                                                        cfg.vision_start_token_id, cfg.vision_end_token_id]
    processor = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=args.vocab - 5))
    prompts = [prompt(args, config, 2)]
    settings = SamplingSettings(n=args.n, max_new_tokens=args.new, prompt_seeds=(7,))
    engines = {share: HFRolloutEngine(model, processor, prefix_sharing=share) for share in (False, True)}

    samples = {share: engines[share].generate(prompts, settings) for share in (False, True)}  # warm-up
    cpu: dict[bool, list[float]] = {False: [], True: []}
    wall: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for share in (False, True):
            t, c = time.perf_counter(), time.process_time()
            engines[share].generate(prompts, settings)
            wall[share].append(time.perf_counter() - t)
            cpu[share].append(time.process_time() - c)
    off, on = statistics.median(cpu[False]), statistics.median(cpu[True])
    same = [r.token_ids for r in samples[False]] == [r.token_ids for r in samples[True]]
    tokens = sum(len(r.token_ids) for r in samples[True])
    print(f"Qwen2.5-VL-class, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.threads} threads; "
          f"prompt {len(prompts[0])} tokens, n {args.n}, {args.new} new tokens ({tokens} sampled)")
    print(f"prefill n times: {off:6.2f} s CPU ({statistics.median(wall[False]):.2f} s wall) | prefill once: "
          f"{on:6.2f} s CPU ({statistics.median(wall[True]):.2f} s wall)")
    print(f"rollout speedup: {off / on:.2f}  same samples: {same}")


if __name__ == "__main__":
    main()
