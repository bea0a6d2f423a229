"""One training step of Vision-OPD (paper Algorithm 1), and the loop around it.

    for each step:
        prompts  ← the next batch (seeded order; the data position is the step number)
        encode   ← each prompt's student view and teacher crop, once
        rollouts ← n responses per prompt, sampled from the student on its view
        for each micro-batch of whole prompts:
            teacher hidden states at the response positions, no gradient   (crop + same text + response)
            student hidden states at the response positions               (student view + response)
            per-token divergence over the student's top-k + tail, projected to the vocabulary in chunks
            backward with the reduction's token weights
        clip the gradient at 1.0, AdamW step, scheduler step, teacher update (EMA)

Ground-truth answers are never read: `data.py` does not even carry them.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vopd_bench.context import for_model as prompt_length_check
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.views import ViewConfig
from vopd_train import checkpoint
from vopd_train.config import NOT_TRAINING, DistillConfig, save_yaml
from vopd_train.data import PromptSet, batch_indices, load_prompts
from vopd_train.losses import chunked_divergence, importance_weight, token_weights
from vopd_train.rollout import (
    EncodedPrompt,
    HFRolloutEngine,
    RolloutEngine,
    SamplingSettings,
    build_sequences,
    encode_prompts,
    head_fn,
    model_family,
    response_hidden,
)
from vopd_train.teachers import Teacher, make_teacher

LOG_FILE = "train_log.jsonl"


@dataclass
class StepStats:
    step: int
    divergence: float  # mean per-token divergence under the reduction's weights (sampled-token: log p_S − log p_T)
    tokens: int
    resp_len: float
    entropy: float
    agree: float  # teacher–student top-1 agreement over response tokens
    grad_norm: float
    lr: float
    sequences: int
    skipped: int
    is_weight: float | None
    t_rollout: float
    t_teacher: float
    t_student: float
    t_other: float
    t_step: float


@dataclass
class TrainResult:
    out: Path
    model_dir: Path
    steps: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def step_seed(seed: int, step: int) -> int:
    """Every step draws from its own seed, so a resumed run samples exactly what an uninterrupted one would."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


class Distiller:
    """Loads the model and data, then trains. `engine` replaces the HF `generate` rollouts (e.g. vLLM)."""

    def __init__(self, cfg: DistillConfig, *, engine: RolloutEngine | None = None,
                 on_step: Callable[[StepStats], None] | None = None, preset: dict | None = None):
        from vopd_bench.modeling import load_model, pick_device_dtype

        self.cfg = cfg.validate()
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.preset = preset or {}
        self.on_step = on_step
        self.device, _ = pick_device_dtype(cfg.device)
        view_cfg = ViewConfig(context=cfg.crop_context, min_side=cfg.crop_min_side, zoom=cfg.crop_zoom)
        self.data: PromptSet = load_prompts(cfg.data, student_view=cfg.student_view, view_config=view_cfg,
                                            limit=cfg.data_limit, data_dir=cfg.data_dir)
        self.skipped: dict[str, str] = {s["id"]: s["reason"] for s in self.data.skipped}
        self.total_steps = cfg.steps or math.ceil(len(self.data.prompts) / cfg.batch_size)

        torch.manual_seed(cfg.seed)
        model, self.processor = load_model(cfg.model, device=self.device, dtype=cfg.dtype,
                                           trust_remote_code=cfg.trust_remote_code)
        self.prompt_length = prompt_length_check(model.config, self.processor)  # over-long prompts are skipped
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if cfg.lora:
            model = _wrap_lora(model, cfg)
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.teacher: Teacher = make_teacher(cfg.teacher, model, cfg.teacher_rate, cfg.lora)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: min(1.0, (k + 1) / warm) if warm > 0 else 1.0)
        if engine is None and cfg.rollout_engine == "vllm":
            from vopd_train.rollout_vllm import VLLMRolloutEngine  # vLLM is imported only when asked for

            engine = VLLMRolloutEngine.for_trainer(cfg, model, self.processor)
        self.engine: RolloutEngine = engine or HFRolloutEngine(model, self.processor)
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.sampling = SamplingSettings(cfg.n_rollouts, cfg.temperature, cfg.max_new_tokens)
        self.step = 0
        self._resume_or_start()
        if self.step:  # an engine with its own copy of the weights (vLLM) still holds the starting ones
            self.engine.sync_weights(self.model)

    # ------------------------------------------------------------------ state

    def _training_config(self) -> dict:
        return {k: v for k, v in self.cfg.to_dict().items() if k not in NOT_TRAINING}

    def _resume_or_start(self) -> None:
        path = checkpoint.state_dir(self.out)
        if path is not None and self.cfg.restart:
            for name in (checkpoint.STATE, checkpoint.STATE + ".old", LOG_FILE):
                p = self.out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            path = None
        if path is None:
            (self.out / LOG_FILE).unlink(missing_ok=True)
            save_yaml(self.cfg, self.out / "config.yaml", {"preset_applied": self.preset})
            return
        state = checkpoint.load_state(path)
        meta = state["meta"]
        # A setting missing from an older saved run had its default then: compare against that.
        defaults = DistillConfig().to_dict()
        saved, now = {**defaults, **meta["config"]}, self._training_config()
        diff = sorted(k for k in set(saved) & set(now) if saved[k] != now[k] and k != "steps")
        if diff:
            raise VopdError(f"{self.out} holds a run with different settings ({', '.join(diff)}); "
                            "pass the same options to resume, or --restart")
        if meta["n_prompts"] != len(self.data.prompts):
            raise VopdError(f"{self.out}: the data changed since the saved run ({meta['n_prompts']} prompts, now "
                            f"{len(self.data.prompts)}); use --restart")
        checkpoint.load_trainable(self.model, state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        self.teacher.load_state_tensors(state["teacher"])
        self.skipped.update(meta.get("skipped", {}))
        self.step = int(meta["step"])
        _truncate_log(self.out / LOG_FILE, self.step)

    def save_state(self) -> None:
        meta = {"step": self.step, "config": self._training_config(), "n_prompts": len(self.data.prompts),
                "skipped": self.skipped}
        checkpoint.save_state(self.out, meta=meta, student=checkpoint.trainable_tensors(self.model),
                              optimizer=self.optimizer, scheduler=self.scheduler, teacher=self.teacher.state_tensors())
        if self.skipped:
            with (self.out / "skipped.jsonl").open("w", encoding="utf-8") as f:
                for pid, reason in self.skipped.items():
                    f.write(json.dumps({"id": pid, "reason": reason}) + "\n")

    # ------------------------------------------------------------------ loop

    def train(self) -> TrainResult:
        t0 = time.perf_counter()
        with (self.out / LOG_FILE).open("a", encoding="utf-8") as log:
            while self.step < self.total_steps:
                stats = self.train_step(self.step)
                self.step += 1
                log.write(json.dumps(stats.__dict__) + "\n")
                log.flush()
                if self.on_step is not None:
                    self.on_step(stats)
                if self.step % self.cfg.save_every == 0 or self.step == self.total_steps:
                    self.save_state()
        model_dir = checkpoint.save_final(self.model, self.processor, self.out, self.cfg.lora)
        history = read_log(self.out / LOG_FILE)
        if history:
            from vopd_train.plots import plot_curves

            plot_curves(history, self.out / "train_curves.png")
        return TrainResult(self.out, model_dir, self.step, history, time.perf_counter() - t0)

    def _render(self, indices: list[int]) -> tuple[list[EncodedPrompt], list[EncodedPrompt]]:
        students, teachers, texts = [], [], []
        for i in indices:
            prompt = self.data.prompts[i]
            try:
                r = prompt.render()
                self.prompt_length.check(r.text, [r.student_image.size, r.teacher_image.size], self.cfg.max_new_tokens)
            except SampleError as e:
                self.skipped[prompt.id] = str(e)
                continue
            students.append(r.student_image)
            teachers.append(r.teacher_image)
            texts.append(r.text)
        return encode_prompts(self.processor, students, texts), encode_prompts(self.processor, teachers, texts)

    def train_step(self, step: int) -> StepStats:
        cfg = self.cfg
        _set_step_seed(step_seed(cfg.seed, step))
        t_start = time.perf_counter()
        indices = batch_indices(len(self.data.prompts), cfg.batch_size, step, cfg.seed)
        student_prompts, teacher_prompts = self._render(indices)

        t = time.perf_counter()
        rollouts = [r for r in self.engine.generate(student_prompts, self.sampling) if r.token_ids]
        _sync(self.device)
        t_rollout = time.perf_counter() - t

        lengths = torch.tensor([len(r.token_ids) for r in rollouts], dtype=torch.long)
        weights = token_weights(lengths, cfg.reduction).to(self.device)  # sums to 1 over the step's tokens
        offsets = [0, *torch.cumsum(lengths, 0).tolist()]
        behaviour = None  # log π_rollout per token, when the engine reports it
        if rollouts and all(r.logprobs is not None for r in rollouts):
            behaviour = torch.tensor([lp for r in rollouts for lp in r.logprobs], dtype=torch.float32).to(self.device)

        acc = {"div": 0.0, "ent": 0.0, "agree": 0.0, "isw": 0.0, "t_teacher": 0.0, "t_student": 0.0}
        grad_norm = float("nan")
        for update in range(cfg.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            logps = []
            for group in self._micro_batches(rollouts):
                a, b = offsets[group[0]], offsets[group[-1] + 1]
                resp = [rollouts[k].token_ids for k in group]
                owner = [rollouts[k].prompt_index for k in group]
                out = self._backward_micro(teacher_prompts, student_prompts, resp, owner, weights[a:b],
                                           behaviour[a:b] if behaviour is not None else None, acc)
                logps.append(out.student_logp)
                if update == 0:
                    div = out.loss if cfg.objective == "logits" else out.student_logp - out.teacher_logp
                    acc["div"] += float((div.detach() * weights[a:b]).sum())
                    acc["ent"] += float(out.entropy.sum())
                    acc["agree"] += float(out.agree.float().sum())
            if behaviour is None and cfg.updates_per_batch > 1:
                # later updates reuse these rollouts: weight them against the policy that drew them
                behaviour = torch.cat(logps) if logps else None
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
            if math.isfinite(grad_norm):
                self.optimizer.step()
                self.teacher.update()
            self.scheduler.step()
            self.engine.sync_weights(self.model)

        n_tok = int(lengths.sum())
        t_step = time.perf_counter() - t_start
        return StepStats(
            step=step + 1, divergence=acc["div"], tokens=n_tok,
            resp_len=float(lengths.float().mean()) if len(lengths) else 0.0,
            entropy=acc["ent"] / max(n_tok, 1), agree=acc["agree"] / max(n_tok, 1), grad_norm=grad_norm,
            lr=self.optimizer.param_groups[0]["lr"], sequences=len(rollouts), skipped=len(self.skipped),
            is_weight=(acc["isw"] / cfg.updates_per_batch) if cfg.importance_weight else None,
            t_rollout=t_rollout, t_teacher=acc["t_teacher"], t_student=acc["t_student"],
            t_other=t_step - t_rollout - acc["t_teacher"] - acc["t_student"], t_step=t_step,
        )

    def _micro_batches(self, rollouts: list) -> list[list[int]]:
        """Groups of sequence indices made of whole prompts, so a prompt's image is encoded once per forward."""
        per_micro = max(1, self.cfg.micro_batch_size // self.cfg.n_rollouts)
        per_prompt = [list(g) for _, g in itertools.groupby(range(len(rollouts)), key=lambda k: rollouts[k].prompt_index)]
        return [sum(per_prompt[i:i + per_micro], []) for i in range(0, len(per_prompt), per_micro)]

    def _backward_micro(self, teacher_prompts: list[EncodedPrompt], student_prompts: list[EncodedPrompt],
                        responses: list[list[int]], owner: list[int], weights: torch.Tensor,
                        behaviour: torch.Tensor | None, acc: dict) -> Any:
        """Teacher forward (no grad), student forward, per-token divergence, backward of Σ weight·loss."""
        cfg = self.cfg
        t = time.perf_counter()
        family = model_family(self.model)
        teacher_batch = build_sequences(teacher_prompts, responses, owner, self.pad_id, family).to(self.device)
        teacher_hidden = self.teacher.hidden(teacher_batch)
        _sync(self.device)
        acc["t_teacher"] += time.perf_counter() - t

        t = time.perf_counter()
        student_batch = build_sequences(student_prompts, responses, owner, self.pad_id, family).to(self.device)
        student_hidden = response_hidden(self.model, student_batch)
        out = chunked_divergence(
            student_hidden, teacher_hidden, head_fn(self.model), self.teacher.head, student_batch.targets,
            alpha=cfg.alpha, topk=cfg.topk or None, add_tail=cfg.add_tail, objective=cfg.objective,
            temperature=cfg.temperature, trust_region_rate=self.teacher.trust_region_rate,
            chunk_size=cfg.loss_chunk_size)
        w = weights
        if cfg.importance_weight:
            iw = importance_weight(out.student_logp, behaviour, cfg.is_clip) if behaviour is not None else torch.ones_like(w)
            acc["isw"] += float((iw * weights).sum())
            w = w * iw
        (out.loss * w).sum().backward()
        _sync(self.device)
        acc["t_student"] += time.perf_counter() - t
        return out


def _wrap_lora(model: Any, cfg: DistillConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    targets: Any = cfg.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets)
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, lcfg)
    except ValueError as e:
        raise VopdError(f"cannot attach LoRA: {str(e).splitlines()[0]}") from None


def _set_step_seed(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _truncate_log(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its last save: drop their lines so none is logged twice."""
    rows = [r for r in read_log(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
