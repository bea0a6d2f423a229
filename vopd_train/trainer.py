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

import contextlib
import itertools
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from vopd_bench import distributed
from vopd_bench.context import for_model as prompt_length_check
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.families import family_of
from vopd_bench.views import ViewConfig
from vopd_train import checkpoint, dcp_state, fsdp, recompute
from vopd_train.best import BestKeeper, BestRecord, best_summary
from vopd_train.config import NOT_TRAINING, DistillConfig, save_yaml
from vopd_train.data import PromptSet, batch_indices, load_prompts, replay_count, replay_source
from vopd_train.evaluate import Validator
from vopd_train.losses import ANCHOR_ALPHA, chunked_divergence, importance_weight, token_weights
from vopd_train.prefix import scored_hidden
from vopd_train.reuse import reuse_for, reused_or_scored
from vopd_train.rollout import (
    EncodedPrompt,
    HFRolloutEngine,
    RolloutEngine,
    SamplingSettings,
    build_sequences,
    encode_prompts,
    head_fn,
    model_family,
)
from vopd_train.sampling import prompt_seed
from vopd_train.teachers import Teacher, make_teacher

LOG_FILE = "train_log.jsonl"
# During a run, train_curves.png is redrawn after an evaluation at most this often (a redraw costs about half a
# second of CPU; a short run, e.g. in the tests, would spend more time drawing than training). It is always drawn
# when train() ends.
PLOT_EVERY_S = 60.0


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
    t_teacher: float | None  # None on a GPU without --profile (timing the phases needs host syncs)
    t_student: float | None
    t_other: float | None
    t_step: float
    anchor: float | None = None  # the crop anchor (KL(start ‖ student) on the crop), under the reduction's weights


@dataclass
class TrainResult:
    out: Path
    model_dir: Path
    steps: int
    history: list[dict] = field(default_factory=list)  # the training steps
    seconds: float = 0.0
    evals: list[dict] = field(default_factory=list)  # the evaluations (--eval-every)
    best: BestRecord | None = None  # the evaluation whose weights are in model_dir (None: the last weights)


def step_seed(seed: int, step: int) -> int:
    """Every step draws from its own seed, so a resumed run samples exactly what an uninterrupted one would."""
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1)


class Distiller:
    """Loads the model and data, then trains. `engine` replaces the HF `generate` rollouts (e.g. vLLM)."""

    def __init__(self, cfg: DistillConfig, *, engine: RolloutEngine | None = None,
                 on_step: Callable[[StepStats], None] | None = None, preset: dict | None = None,
                 on_eval: Callable[[dict], None] | None = None, on_note: Callable[[str], None] | None = None):
        from vopd_bench.modeling import pick_device_dtype

        self.cfg = cfg.validate()
        self._plotted_at = time.perf_counter()  # the curves are first drawn PLOT_EVERY_S in, or at the end
        if engine is None and cfg.rollout_engine == "vllm":
            from vopd_train.rollout_vllm import preflight  # vLLM is imported only when asked for

            preflight(cfg)  # no vLLM, no sleep mode where asked for: one line before any work
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        # Under torchrun: one rank per device, the global batch split over ranks, FSDP2 over the model.
        self.place = distributed.init(timeout=timedelta(minutes=cfg.dist_timeout))
        if self.place.enabled and cfg.batch_size < self.place.world_size:
            raise VopdError(f"--batch-size {cfg.batch_size} is smaller than the {self.place.world_size} ranks: "
                            "every rank needs at least one prompt per step")
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.preset = preset or {}
        self.on_step = on_step
        self.device = self.place.device if self.place.enabled else pick_device_dtype(cfg.device)[0]
        view_cfg = ViewConfig(context=cfg.crop_context, min_side=cfg.crop_min_side, zoom=cfg.crop_zoom)
        self.data: PromptSet = load_prompts(cfg.data, student_view=cfg.student_view, view_config=view_cfg,
                                            limit=cfg.data_limit, data_dir=cfg.data_dir)
        self.skipped: dict[str, str] = {s["id"]: s["reason"] for s in self.data.skipped}
        self.total_steps = cfg.steps or math.ceil(len(self.data.prompts) / cfg.batch_size)
        # --replay: the both-right cases go after the mined prompts; each batch takes a fixed share of them
        self.n_mined, self.n_replay = len(self.data.prompts), 0
        if cfg.replay > 0:
            replay = load_prompts(str(replay_source(cfg.data)), student_view=cfg.student_view, view_config=view_cfg,
                                  limit=cfg.data_limit, data_dir=cfg.data_dir)
            self.data.prompts.extend(replay.prompts)
            self.skipped.update({s["id"]: s["reason"] for s in replay.skipped})
            self.n_replay = len(replay.prompts)
        self.validator = self._validator()
        self.on_eval = on_eval

        torch.manual_seed(cfg.seed)
        model, self.processor, copy = self._load_student()
        self.prompt_length = prompt_length_check(model.config, self.processor)  # over-long prompts are skipped
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.teacher: Teacher = make_teacher(cfg.teacher, model, cfg.teacher_rate, cfg.lora, copy)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda k: min(1.0, (k + 1) / warm) if warm > 0 else 1.0)
        if engine is None and cfg.rollout_engine == "vllm":
            from vopd_train.rollout_vllm import VLLMRolloutEngine, trainer_compute_dtype

            if cfg.vllm_dtype == "auto":  # recorded resolved in config.yaml
                cfg.vllm_dtype = trainer_compute_dtype(cfg.dtype, self.device)
            engine = VLLMRolloutEngine.for_trainer(cfg, model, self.processor, self.place)
        self.engine: RolloutEngine = engine or HFRolloutEngine(model, self.processor, cfg.prefix_sharing)
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.reuse = reuse_for(self.engine, model, self.pad_id, cfg, distributed=self.place.enabled)
        self.sampling = SamplingSettings(cfg.n_rollouts, cfg.temperature, cfg.max_new_tokens)

        self.anchor_ref: Teacher | None = None  # the starting model on the crop, for --crop-anchor
        if cfg.crop_anchor > 0:
            if self.teacher.kind in ("frozen", "trust-region"):  # its hidden states are the starting model's
                self.anchor_ref = self.teacher
            else:
                self.anchor_ref = make_teacher("frozen", model, 0.0, cfg.lora, copy)
                if not cfg.lora and on_note is not None:
                    on_note("crop anchor: keeping a frozen copy of the starting weights (full fine-tuning with a "
                            f"{cfg.teacher} teacher); --teacher frozen or --lora would need none")
        self.step = 0
        self._resume_or_start()
        self.best: BestKeeper | None = None
        if self.validator is not None and cfg.keep_best != "last":
            self.best = BestKeeper(self.out, cfg.keep_best)
            if self.step:
                self.best.load()
            else:
                self.best.clear()
        if self.step:  # an engine with its own copy of the weights (vLLM) still holds the starting ones
            self.engine.sync_weights(self.model)

    def _load_student(self) -> tuple[Any, Any, Callable[[Any], Any] | None]:
        """(model, processor, copy): the student ready to train, and how a teacher copies it (None: a deep copy).

        Under torchrun the model is sharded from the first byte (`sharded_load`): built on the meta device,
        sharded, and each rank reads only its rows of the checkpoint; a teacher's copy is filled from the
        student's shards. Activation recomputation and LoRA are applied before the weights are read."""
        cfg = self.cfg

        def kernels(model: Any) -> Any:
            if (swap := family_of(model.config).training_kernels) is not None:
                swap(model)  # same arithmetic, faster kernels (vopd_bench.families)
            return model

        def prepare(model: Any) -> Any:
            kernels(model)
            if cfg.gradient_checkpointing:
                recompute.enable(model)
            return _wrap_lora(model, cfg) if cfg.lora else model

        if self.place.enabled:
            from vopd_train.sharded_load import ShardedLoader

            loader = ShardedLoader(cfg.model, self.device, cfg.dtype, cfg.trust_remote_code)
            model, processor = loader.student(prepare)
            return model, processor, lambda student: kernels(loader.copy_of(student))  # the teacher's kernels too
        from vopd_bench.modeling import load_model

        model, processor = load_model(cfg.model, device=self.device, dtype=cfg.dtype,
                                      trust_remote_code=cfg.trust_remote_code)
        return prepare(model), processor, None

    # ------------------------------------------------------------------ state

    def _training_config(self) -> dict:
        return {k: v for k, v in self.cfg.to_dict().items() if k not in NOT_TRAINING}

    def _resume_or_start(self) -> None:
        path = checkpoint.state_dir(self.out)
        main = self.place.is_main
        if path is not None and self.cfg.restart:
            for name in (checkpoint.STATE, checkpoint.STATE + ".old", LOG_FILE):
                p = self.out / name
                if not main:
                    continue
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            path = None
        if path is None:
            if main:
                (self.out / LOG_FILE).unlink(missing_ok=True)
                save_yaml(self.cfg, self.out / "config.yaml", {"preset_applied": self.preset})
            distributed.barrier()
            return
        if dcp_state.is_dcp(path):  # saved under torchrun, at any world size
            self._check_resumable(json.loads((path / "trainer_state.json").read_text(encoding="utf-8")))
            meta = dcp_state.load(path, model=self.model, optimizer=self.optimizer,
                                  teacher=self.teacher.state_tensors())
            self.scheduler.load_state_dict({**meta["scheduler"],
                                            "lr_lambdas": [None] * len(self.optimizer.param_groups)})
            self._resumed(meta)
            return
        state = checkpoint.load_state(path)
        meta = state["meta"]
        self._check_resumable(meta)
        if self.place.enabled:  # saved by a single process: every rank reads it whole and keeps its shards
            dcp_state.load_single_process_state(state, model=self.model, params=self.params,
                                                optimizer=self.optimizer, teacher=self.teacher.state_tensors())
            self.scheduler.load_state_dict({**state["scheduler"],
                                            "lr_lambdas": [None] * len(self.optimizer.param_groups)})
            self._resumed(meta)
            return
        checkpoint.load_trainable(self.model, state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        self.teacher.load_state_tensors(state["teacher"])
        self._resumed(meta)

    def _check_resumable(self, meta: dict) -> None:
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

    def _resumed(self, meta: dict) -> None:
        self.skipped.update(meta.get("skipped", {}))
        self.step = int(meta["step"])
        if self.place.is_main:
            _truncate_log(self.out / LOG_FILE, self.step)
        distributed.barrier()

    def _validator(self) -> Validator | None:
        from vopd_train.remeasure import held_out_benchmarks, validation_benchmarks

        cfg = self.cfg
        if cfg.eval_every is None:
            return None
        remeasured = held_out_benchmarks(self.data.kind, self.data.benchmarks, cfg.remeasure_benchmarks)
        benches = validation_benchmarks(self.data.benchmarks, cfg.eval_benchmarks, remeasured)
        if not benches:
            raise VopdError("--eval-every: no validation benchmark known for this data; pass --eval-benchmarks")
        return Validator(benches, limit=cfg.eval_limit, batch_size=cfg.eval_batch_size,
                         max_new_tokens=cfg.eval_max_new_tokens, data_dir=cfg.data_dir)

    def save_state(self) -> None:
        meta = {"step": self.step, "config": self._training_config(), "n_prompts": len(self.data.prompts),
                "skipped": self.skipped}
        if self.place.enabled:
            dcp_state.save(self.out, meta=meta, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                           teacher=self.teacher.state_tensors())
        else:
            checkpoint.save_state(self.out, meta=meta, student=checkpoint.trainable_tensors(self.model),
                                  optimizer=self.optimizer, scheduler=self.scheduler,
                                  teacher=self.teacher.state_tensors())
        if self.skipped and self.place.is_main:
            with (self.out / "skipped.jsonl").open("w", encoding="utf-8") as f:
                for pid, reason in self.skipped.items():
                    f.write(json.dumps({"id": pid, "reason": reason}) + "\n")

    # ------------------------------------------------------------------ loop

    def train(self) -> TrainResult:
        t0 = time.perf_counter()
        main = self.place.is_main  # rank 0 logs, with statistics reduced over the ranks
        with (self.out / LOG_FILE).open("a", encoding="utf-8") if main else contextlib.nullcontext() as log:
            if self.validator is not None and self.step == 0:
                self.evaluate(log)  # the starting model: the baseline of the curves, and a candidate
            while self.step < self.total_steps:
                stats = self.train_step(self.step)
                self.step += 1
                if log is not None:
                    log.write(json.dumps(stats.__dict__) + "\n")
                    log.flush()
                if self.on_step is not None and main:
                    self.on_step(stats)
                evaluated = self.validator is not None and (self.step % self.cfg.eval_every == 0
                                                            or self.step == self.total_steps)
                if evaluated:
                    self.evaluate(log)
                # saved after every evaluation too, so a resumed run holds the same best-so-far (see best.py)
                if evaluated or self.step % self.cfg.save_every == 0 or self.step == self.total_steps:
                    self.save_state()
        model_dir = self._save_model()
        if not main:
            return TrainResult(self.out, model_dir, self.step, [], time.perf_counter() - t0)
        if self.best is not None and self.best.best is not None:  # which step won, and why
            save_yaml(self.cfg, self.out / "config.yaml", {"preset_applied": self.preset,
                                                            "best": best_summary(self.best.best)})
        history, evals = split_log(read_log(self.out / LOG_FILE))
        self._plot(history, evals)
        return TrainResult(self.out, model_dir, self.step, history, time.perf_counter() - t0, evals,
                           self.best.best if self.best is not None else None)

    def evaluate(self, log: Any) -> dict:
        """Validate the live model, log the result, and keep its weights if they are the best so far. Under
        torchrun every rank takes part (each asks its share of the questions); rank 0 logs."""
        t = time.perf_counter()
        metrics = self.validator.evaluate(self.model, self.processor).metrics()
        won = self.best is not None and self._offer_best(metrics)
        row = {"step": self.step, "kind": "eval", **metrics, "best": won, "t_eval": time.perf_counter() - t}
        if log is None:  # a rank other than 0
            return row
        log.write(json.dumps(row) + "\n")
        log.flush()
        if self.on_eval is not None:
            self.on_eval(row)
        if time.perf_counter() - self._plotted_at >= PLOT_EVERY_S:  # watchable while the run goes on
            self._plot(*split_log(read_log(self.out / LOG_FILE)))
        return row

    def _offer_best(self, metrics: dict) -> bool:
        """Offer the live weights to the best keeper: full tensors in one process, each rank's shards under
        torchrun (no rank gathers them)."""
        assert self.best is not None
        if self.place.enabled:
            return self.best.offer(self.step, metrics, write=lambda folder: dcp_state.save_trainable(folder, self.model))
        return self.best.offer(self.step, metrics, lambda: checkpoint.trainable_tensors(self.model))

    def _load_best(self) -> None:
        """Put the kept best weights back into the live model, whoever saved them (one process or torchrun)."""
        assert self.best is not None
        if self.best.sharded():
            dcp_state.load_trainable(self.best.dir, self.model)
        elif self.place.enabled:
            dcp_state.load_full_trainable(self.model, self.best.tensors())
        else:
            checkpoint.load_trainable(self.model, self.best.tensors())

    def _plot(self, history: list[dict], evals: list[dict]) -> None:
        self._plotted_at = time.perf_counter()
        if history or evals:
            from vopd_train.plots import plot_curves

            best = self.best.best.step if self.best is not None and self.best.best is not None else None
            plot_curves(history, self.out / "train_curves.png", evals=evals, best_step=best)

    def _save_model(self) -> Path:
        """OUT/model: the best evaluated weights (the last without selection); OUT/model_last on request."""
        if self.place.enabled:
            return self._save_model_sharded()
        best = self.best.best if self.best is not None else None
        last_dir = self.out / "model_last"
        if best is None or best.step == self.step:
            model_dir = checkpoint.save_final(self.model, self.processor, self.out, self.cfg.lora)
            if self.cfg.keep_last:  # the last weights are the best ones
                shutil.rmtree(last_dir, ignore_errors=True)
                shutil.copytree(model_dir, last_dir)
            return model_dir
        if self.cfg.keep_last:
            if self.cfg.lora:  # merging is in place: keep the adapter, merge it into a fresh base afterwards
                self.model.save_pretrained(self.out / "adapter_last")
            else:
                self.model.save_pretrained(last_dir, safe_serialization=True)
                self.processor.save_pretrained(last_dir)
        self._load_best()
        model_dir = checkpoint.save_final(self.model, self.processor, self.out, self.cfg.lora)
        if self.cfg.keep_last and self.cfg.lora:
            checkpoint.merge_lora(self.cfg.model, self.out / "adapter_last", last_dir)
        return model_dir

    def _save_model_sharded(self) -> Path:
        """`_save_model` under torchrun: the same folders, written by rank 0 (`_write_sharded`)."""
        best = self.best.best if self.best is not None else None
        model_dir, last_dir = self.out / "model", self.out / "model_last"
        if best is None or best.step == self.step:
            self._write_sharded(model_dir, self.out / "adapter")
            if self.cfg.keep_last and self.place.is_main:
                shutil.rmtree(last_dir, ignore_errors=True)
                shutil.copytree(model_dir, last_dir)
            distributed.barrier()
            return model_dir
        if self.cfg.keep_last:
            self._write_sharded(last_dir, self.out / "adapter_last")
        self._load_best()
        self._write_sharded(model_dir, self.out / "adapter")
        return model_dir

    def _write_sharded(self, model_dir: Path, adapter_dir: Path) -> None:
        """Collective: write the live weights as a `save_pretrained` folder from rank 0, the others waiting.

        LoRA: only the adapter is gathered (it is all that trained); rank 0 saves it and merges it into the base
        read from disk, as `checkpoint.merge_lora` does. Full fine-tuning: the weights are gathered onto rank
        0's CPU one tensor at a time and written through the architecture built on the meta device (no second
        copy of the model)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.cfg.lora)
        weights = get_model_state_dict(self.model, options=options)
        if self.place.is_main:
            for d in (model_dir, adapter_dir):
                shutil.rmtree(d, ignore_errors=True)
            if self.cfg.lora:
                self.model.save_pretrained(adapter_dir, state_dict=weights)
                checkpoint.merge_lora(self.cfg.model, adapter_dir, model_dir)
            else:
                from vopd_train.sharded_load import ShardedLoader

                net = ShardedLoader(self.cfg.model, "cpu", self.cfg.dtype, self.cfg.trust_remote_code).meta_model()
                for tied in getattr(net, "all_tied_weights_keys", None) or {}:  # gathered as copies: drop them
                    weights.pop(tied, None)
                net.save_pretrained(model_dir, state_dict=weights, safe_serialization=True)
                self.processor.save_pretrained(model_dir)
        del weights
        distributed.barrier()

    def _rank_share(self, indices: list[int]) -> list[int]:
        """This rank's contiguous part of the step's global batch (all of it in a single process)."""
        r, w = self.place.rank, self.place.world_size
        return indices[r * len(indices) // w:(r + 1) * len(indices) // w]

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
        # one processor call for the step's views and crops together (where the family says how to cut it apart)
        both = encode_prompts(self.processor, students + teachers, texts + texts, model_family(self.model))
        return both[:len(students)], both[len(students):]

    def train_step(self, step: int) -> StepStats:
        cfg = self.cfg
        _set_step_seed(step_seed(cfg.seed, step))
        t_start = time.perf_counter()
        indices = self._rank_share(self._batch_indices(step))
        student_prompts, teacher_prompts = self._render(indices)
        kept = [i for i in indices if self.data.prompts[i].id not in self.skipped]
        # rollout j of prompt i draws from its own seed: the same tokens on any number of ranks
        sampling = replace(self.sampling, prompt_seeds=tuple(prompt_seed(cfg.seed, step, i) for i in kept))
        # every rank must take part in every collective: a step some rank has no prompt for is skipped by all
        everyone = min(distributed.all_gather_object(len(student_prompts)))

        t = time.perf_counter()
        rollouts = [r for r in self.engine.generate(student_prompts, sampling) if r.token_ids] if everyone else []
        t_rollout = time.perf_counter() - t

        weights, offsets = self._token_weights(rollouts)  # they sum to 1 over the step's tokens on all ranks
        behaviour = _behaviour_logprobs(rollouts, self.device)  # log π_rollout per token, when the engine has it
        acc = _Totals(self.device, timed=self._timed)
        grad_norm = float("nan")
        for update in range(cfg.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            logps = []
            for group, scale in self._passes(rollouts):
                a, b = offsets[group[0]], offsets[group[-1] + 1]
                resp = [rollouts[k].token_ids for k in group]
                owner = [rollouts[k].prompt_index for k in group]
                out = self._backward_micro(teacher_prompts, student_prompts, resp, owner, weights[a:b] * scale,
                                           behaviour[a:b] if behaviour is not None else None, acc)
                if scale == 0.0:  # a replayed pass (see _passes) adds nothing
                    continue
                logps.append(out.student_logp)
                if update == 0:
                    div = out.loss if cfg.objective == "logits" else out.student_logp - out.teacher_logp
                    acc.add_tokens(div.detach(), weights[a:b], out.entropy, out.agree)
            if behaviour is None and cfg.updates_per_batch > 1:
                # later updates reuse these rollouts: weight them against the policy that drew them
                behaviour = torch.cat(logps) if logps else None
            grad_norm = self._clip_and_step()
            self.engine.sync_weights(self.model)

        div, ent, agree, isw, anchor, n_tok, n_seq = self._reduce(acc, rollouts)
        t_step = time.perf_counter() - t_start
        t_teacher, t_student = (acc.t_teacher, acc.t_student) if self._timed else (None, None)
        return StepStats(
            step=step + 1, divergence=div, tokens=n_tok, resp_len=n_tok / n_seq if n_seq else 0.0,
            entropy=ent / max(n_tok, 1), agree=agree / max(n_tok, 1), grad_norm=grad_norm,
            lr=self.optimizer.param_groups[0]["lr"], sequences=n_seq, skipped=len(self.skipped),
            is_weight=(isw / cfg.updates_per_batch) if cfg.importance_weight else None,
            t_rollout=t_rollout, t_teacher=t_teacher, t_student=t_student,
            t_other=t_step - t_rollout - t_teacher - t_student if self._timed else None, t_step=t_step,
            anchor=anchor / cfg.updates_per_batch if cfg.crop_anchor > 0 else None,
        )

    @property
    def _timed(self) -> bool:
        """Whether the teacher and student phases are timed: always on a CPU (nothing to wait for), on a GPU only
        with --profile, which waits for the GPU after each phase (a host sync per micro-batch)."""
        return self.cfg.profile or not str(self.device).startswith("cuda")

    def _token_weights(self, rollouts: list) -> tuple[torch.Tensor, list[int]]:
        """Every token's weight in the step's loss (`--reduction` over the global batch: the ranks' weights sum to
        1 together) for this rank's tokens, and where each rollout's tokens start."""
        lengths = [len(r.token_ids) for r in rollouts]
        per_rank = distributed.all_gather_object(lengths)
        first = sum(sum(x) for x in per_rank[:self.place.rank])
        everyone = token_weights(torch.tensor([n for x in per_rank for n in x], dtype=torch.long), self.cfg.reduction)
        return everyone[first:first + sum(lengths)].to(self.device), list(itertools.accumulate(lengths, initial=0))

    def _passes(self, rollouts: list) -> Iterator[tuple[list[int], float]]:
        """(sequence indices, weight scale) of each forward/backward pass. Under FSDP every rank runs as many
        passes as the busiest one (each pass is a fixed sequence of collectives); the extra ones replay this
        rank's last group at weight 0."""
        groups = self._micro_batches(rollouts)
        n_passes = distributed.all_reduce_max(len(groups), self.device)
        for g in range(n_passes):
            yield groups[min(g, len(groups) - 1)], (0.0 if g >= len(groups) else 1.0)

    def _clip_and_step(self) -> float:
        """Clip the gradient norm, and take the optimizer step (and the teacher's) if it is finite; the scheduler
        steps either way. Returns the norm before clipping: the step's one read back to the host."""
        cfg = self.cfg
        if self.place.enabled:
            norm = float(fsdp.clip_grad_norm(self.params, cfg.grad_clip))
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        if math.isfinite(norm):
            self.optimizer.step()
            self.teacher.update()
        self.scheduler.step()
        return norm

    def _reduce(self, acc: _Totals, rollouts: list) -> tuple[float, float, float, float, float, int, int]:
        """The step's totals over all ranks, read back once: divergence, entropy, agreement, importance weight,
        anchor, tokens, sequences."""
        tokens = float(sum(len(r.token_ids) for r in rollouts))
        totals = torch.stack([acc.div, acc.ent, acc.agree, acc.isw, acc.anchor,
                              torch.tensor(tokens, dtype=torch.float64, device=self.device),
                              torch.tensor(float(len(rollouts)), dtype=torch.float64, device=self.device)])
        if distributed.active():
            torch.distributed.all_reduce(totals)
            for skipped in distributed.all_gather_object(self.skipped):
                self.skipped.update(skipped)
        div, ent, agree, isw, anchor, n_tok, n_seq = totals.tolist()
        return div, ent, agree, isw, anchor, int(n_tok), int(n_seq)

    def _batch_indices(self, step: int) -> list[int]:
        """The step's prompts: the mined ones and, with --replay, a fixed share of both-right ones after them."""
        cfg = self.cfg
        k = replay_count(cfg.batch_size, cfg.replay) if self.n_replay else 0
        mined = batch_indices(self.n_mined, cfg.batch_size - k, step, cfg.seed)
        return mined + [self.n_mined + i for i in batch_indices(self.n_replay, k, step, cfg.seed + 1)] if k else mined

    def _micro_batches(self, rollouts: list) -> list[list[int]]:
        """Groups of sequence indices made of whole prompts, so a prompt's image is encoded once per forward."""
        per_micro = max(1, self.cfg.micro_batch_size // self.cfg.n_rollouts)
        per_prompt = [list(g) for _, g in itertools.groupby(range(len(rollouts)), key=lambda k: rollouts[k].prompt_index)]
        return [sum(per_prompt[i:i + per_micro], []) for i in range(0, len(per_prompt), per_micro)]

    def _backward_micro(self, teacher_prompts: list[EncodedPrompt], student_prompts: list[EncodedPrompt],
                        responses: list[list[int]], owner: list[int], weights: torch.Tensor,
                        behaviour: torch.Tensor | None, acc: _Totals) -> Any:
        """Teacher forward (no grad), student forward, per-token divergence, backward of Σ weight·loss."""
        cfg = self.cfg
        family = model_family(self.model)
        with acc.timing("t_teacher"):
            teacher_batch = build_sequences(teacher_prompts, responses, owner, self.pad_id, family).to(self.device)
            teacher_hidden = self.teacher.hidden(teacher_batch, cfg.prefix_sharing)

        with acc.timing("t_student"):
            student_batch = build_sequences(student_prompts, responses, owner, self.pad_id, family).to(self.device)
            student_hidden = reused_or_scored(self.reuse, self.model, student_batch, cfg.prefix_sharing)
            with self._heads(self.teacher):
                out = chunked_divergence(
                    student_hidden, teacher_hidden, head_fn(self.model), self.teacher.head, student_batch.targets,
                    alpha=cfg.alpha, topk=cfg.topk or None, add_tail=cfg.add_tail, objective=cfg.objective,
                    temperature=cfg.temperature, trust_region_rate=self.teacher.trust_region_rate,
                    chunk_size=cfg.loss_chunk_size)
                w = weights
                if cfg.importance_weight:
                    iw = (importance_weight(out.student_logp, behaviour, cfg.is_clip) if behaviour is not None
                          else torch.ones_like(w))
                    acc.isw += (iw * weights).sum()
                    w = w * iw
                (out.loss * w).sum().backward()
            if self.anchor_ref is not None:
                acc.anchor += self._crop_anchor(teacher_batch, teacher_hidden, weights)
        return out

    def _heads(self, teacher: Teacher) -> contextlib.AbstractContextManager:
        """Under FSDP, the student's and `teacher`'s LM heads gathered for one loss and its backward
        (`fsdp.gathered_heads`); nothing to do in one process. Enter it after the forwards that give the loss its
        hidden states: with tied embeddings a backbone forward ends by resharding the head's unit."""
        if not self.place.enabled:
            return contextlib.nullcontext()
        nets = {id(m): m for m in (self.model, teacher.network())}
        return fsdp.gathered_heads(*nets.values())

    def _crop_anchor(self, crop_batch: Any, teacher_hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ weight·KL(start ‖ student) on the crop sequences the teacher already scored (losses.anchor_divergence),
        backward of --crop-anchor times it; returns it, detached."""
        cfg, ref = self.cfg, self.anchor_ref
        assert ref is not None
        ref_hidden = teacher_hidden if ref is self.teacher else ref.hidden(crop_batch, cfg.prefix_sharing)
        student_hidden = scored_hidden(self.model, crop_batch, cfg.prefix_sharing)  # the teacher's path: 0 at start
        with self._heads(ref):
            out = chunked_divergence(
                student_hidden, ref_hidden, head_fn(self.model), ref.head, crop_batch.targets,
                alpha=ANCHOR_ALPHA, topk=cfg.topk or None, add_tail=cfg.add_tail, temperature=cfg.temperature,
                chunk_size=cfg.loss_chunk_size)
            anchor = (out.loss * weights).sum()
            (cfg.crop_anchor * anchor).backward()
        return anchor.detach()


class _Totals:
    """A step's running sums, kept on the device (no host read per micro-batch), and its phase timings."""

    def __init__(self, device: Any, timed: bool):
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.div, self.ent, self.agree, self.isw, self.anchor = (zero.clone() for _ in range(5))
        self.device, self.timed = device, timed
        self.t_teacher = self.t_student = 0.0

    def add_tokens(self, div: torch.Tensor, weights: torch.Tensor, entropy: torch.Tensor, agree: torch.Tensor) -> None:
        self.div += (div * weights).sum()
        self.ent += entropy.sum()
        self.agree += agree.sum()

    @contextlib.contextmanager
    def timing(self, name: str) -> Iterator[None]:
        """Add the block's wall time to `name` when timed; on a GPU that waits for it to finish (--profile)."""
        if not self.timed:
            yield
            return
        t = time.perf_counter()
        yield
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
        setattr(self, name, getattr(self, name) + time.perf_counter() - t)


def _behaviour_logprobs(rollouts: list, device: Any) -> torch.Tensor | None:
    """log π_rollout of every token, flat, when the engine reported them for every rollout."""
    if rollouts and all(r.logprobs is not None for r in rollouts):
        return torch.tensor([lp for r in rollouts for lp in r.logprobs], dtype=torch.float32).to(device)
    return None


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


def split_log(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """train_log.jsonl rows as (training steps, evaluations)."""
    return [r for r in rows if r.get("kind") != "eval"], [r for r in rows if r.get("kind") == "eval"]


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _truncate_log(path: Path, step: int) -> None:
    """A resumed run redoes the steps after its last save: drop their lines so none is logged twice."""
    rows = [r for r in read_log(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
