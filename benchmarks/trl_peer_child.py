"""One TRL run of `benchmarks/trl_peer.py`: TRL's `DistillationTrainer` on the prompts the parent wrote.

Runs in the TRL venv (`benchmarks/trl_peer_setup.py`) and imports nothing from vopd. The parent passes the data
folder (Vision-OPD-6K layout: `train.jsonl` with the student image, the teacher crop and the text), the order of
its rows (the prompts of every step, as vopd draws them) and the settings; this writes a JSON result: per-step
times (wall and CPU), the training seconds, the trainable parameter count and a hash of every step's prompt
token ids.

TRL takes one image per prompt and its teacher reads the same inputs as its student, so the crop is not used
here (see docs/results/trl-peer.md). n samples per prompt are n copies of the prompt in the batch, its only way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--order", required=True, help="JSON list: the data rows of every step, in order")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", required=True)
    args = ap.parse_args()

    from datasets import Dataset, Image
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    folder = Path(args.data)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text(encoding="utf-8").splitlines() if line]
    order = json.loads(Path(args.order).read_text(encoding="utf-8"))
    texts, images = [], []
    for i in order:  # every prompt n times in a row: TRL's only way to draw n samples of it
        row = rows[i]
        text = row["problem"].replace("<image>", "").strip()
        for _ in range(args.n):
            texts.append([{"role": "user", "content": text}])
            images.append(str(folder / row["images"][0]))
    dataset = Dataset.from_dict({"prompt": texts, "image": images}).cast_column("image", Image())

    prompt_hashes: list[str] = []

    class Recording(DistillationTrainer):
        def _tokenize_prompts(self, prompts):
            out = super()._tokenize_prompts(prompts)
            ids = [list(map(int, x)) for x in out[0]][::args.n]  # each prompt once
            prompt_hashes.append(hashlib.sha256(json.dumps(ids).encode()).hexdigest())
            return out

    stamps: list[tuple[float, float]] = []
    begin: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            begin.append(time.time())
            stamps.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):
            stamps.append((time.perf_counter(), time.process_time()))

    config = DistillationConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch * args.n,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, optim="adamw_torch",
        beta=0.5, temperature=1.0, top_k=0, top_p=1.0, max_completion_length=args.max_new_tokens,
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, shuffle_dataset=False,
        dataloader_num_workers=0, report_to="none", logging_steps=1, disable_tqdm=True, eval_strategy="no",
        save_strategy="steps", save_steps=10**6,  # one resumable checkpoint at the end, as vopd saves its state
        seed=args.seed, model_init_kwargs={"dtype": "float32"}, teacher_model_init_kwargs={"dtype": "float32"},
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    trainer = Recording(model=args.model, teacher_model=args.model, args=config, train_dataset=dataset,
                        peft_config=lora, callbacks=[Clock()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    w0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - w0, time.process_time() - c0
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:], strict=False)]
    Path(args.result).write_text(json.dumps({
        "side": "trl", "step_wall": [s[0] for s in steps], "step_cpu": [s[1] for s in steps],
        "train_seconds": seconds, "train_cpu": cpu, "train_begin": begin[0],
        "trainable": trainable, "prompt_hashes": prompt_hashes, "responses_per_step": args.batch * args.n,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "process_cpu": time.process_time(),
    }), encoding="utf-8")


if __name__ == "__main__":
    main()
