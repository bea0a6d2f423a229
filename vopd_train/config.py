"""Every setting of `vopd distill`, in one dataclass. The help text of each field is the `--help` text.

Settings are resolved in this order, later winning: the dataclass defaults, the toy preset (only when MODEL is
`toy`), a YAML file (`--config`), the command-line flags.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vopd_bench.errors import VopdError

TEACHERS = ("ema", "frozen", "current", "trust-region")
STUDENT_VIEWS = ("full", "box")
OBJECTIVES = ("logits", "sampled-token")
REDUCTIONS = ("seq-mean", "token-mean")
ROLLOUT_ENGINES = ("hf", "vllm")
KEEP_BEST = ("mean_full_crop", "full", "last")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if callable(default) and not isinstance(default, type):
        return field(default_factory=default, metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DistillConfig:
    model: str = _opt("", "Starting model: `toy`, a local folder or a hub id.", positional=True)
    data: str = _opt("", "Prompts: a gap-report failures.jsonl, a benchmark split with boxes (synthetic:train, "
                         "local:PATH) or a Vision-OPD-6K folder (train.jsonl with images, teacher_images, problem).")
    out: str = _opt("", "Output folder: weights, logs, resumable state, re-measure.")

    # data and views
    student_view: str = _opt("full", "What the student sees: `full` (the image as at test time) or `box` (the red "
                                     "box plus the paper's hint, as in the authors' data). The teacher always sees the "
                                     "evidence crop with the student's text.")
    data_limit: int | None = _opt(None, "Use at most this many prompts from the source.")
    data_dir: str | None = _opt(None, "Local copy of a hub benchmark's dataset repository, for benchmark sources, "
                                      "failures.jsonl records whose images live in the dataset, and the re-measure.")
    crop_context: float = _opt(1.0, "Teacher crop side as a multiple of the evidence box (1.0 = tight).")
    crop_min_side: int = _opt(28, "Smallest teacher-crop side in source pixels.")
    crop_zoom: float = _opt(2.0, "Resize factor of the teacher crop (the paper uses 2).")

    # rollouts
    n_rollouts: int = _opt(8, "Responses sampled per prompt from the student.")
    temperature: float = _opt(1.0, "Sampling temperature of the rollouts (the loss uses the same temperature).")
    max_new_tokens: int = _opt(1024, "Longest rollout, in tokens (the paper's default is 1024).")
    rollout_engine: str = _opt("hf", "What samples the rollouts: `hf` (transformers generate on the training model) "
                                     "or `vllm` (vLLM's offline engine on the same GPU, its weights synced after "
                                     "every update; needs vopd's `vllm` extra). vLLM reports each token's "
                                     "log-prob, so add --importance-weight to correct for its kernels and dtype.")
    vllm_gpu_memory_utilization: float = _opt(0.5, "Fraction of the GPU's memory vLLM may take (weights and KV "
                                                   "cache); the rest is left for training. Engines sharing a GPU "
                                                   "split it. On a CPU: the share of the host's available memory "
                                                   "for the KV caches, split between the ranks on the host.")
    vllm_tensor_parallel_size: int = _opt(1, "GPUs per vLLM engine (tensor parallel), under torchrun: the ranks "
                                             "form groups of this many consecutive ranks, each group one engine "
                                             "holding 1/K of the weights and KV cache on each of its GPUs; must "
                                             "divide the number of ranks. For a model whose engine does not fit "
                                             "one GPU beside training.")
    vllm_eager: bool = _opt(False, "Run vLLM without compilation or CUDA graphs: starts in seconds "
                                           "instead of a minute or more, generates more slowly.")
    vllm_dtype: str = _opt("auto", "vLLM's dtype: auto (the trainer's compute dtype: float32 on a CPU, bfloat16 "
                                   "on a GPU or with --dtype bfloat16), float32, bfloat16 or float16. Recorded "
                                   "resolved in config.yaml.")
    sync_bucket_mb: float = _opt(512.0, "Largest bucket of a weight sync into vLLM, in MiB: the weights are cast "
                                        "to vLLM's dtype, gathered and loaded a bucket at a time, so a sync needs "
                                        "at most this much extra memory (or one decoder layer's attention or MLP, "
                                        "if larger).")
    vllm_max_model_len: int | None = _opt(None, "vLLM's longest sequence (prompt + rollout); none = the model's.")
    vllm_sleep_mode: bool = _opt(False, "Let vLLM sleep between rollouts (weights to CPU memory, KV cache freed) "
                                        "so training gets that GPU memory back.")

    # loss
    alpha: float = _opt(0.5, "Generalised-JSD weight: 0 = KL(teacher‖student), 1 = KL(student‖teacher), 0.5 = JSD.")
    topk: int = _opt(100, "Distil over the student's top-k token ids plus a tail bucket; 0 = the full vocabulary.")
    add_tail: bool = _opt(True, "Keep the tail bucket (the mass outside the top-k); off = renormalise over the top-k.")
    objective: str = _opt("logits", "`logits` (top-k logit distillation) or `sampled-token` (the policy-gradient "
                                    "variant of the paper's Table 6).")
    reduction: str = _opt("seq-mean", "`seq-mean` (each response's token mean, then the batch mean, as in the "
                                      "paper) or `token-mean` (one mean over all tokens).")
    updates_per_batch: int = _opt(1, "Optimizer updates per batch of rollouts (>1 reuses rollouts; use with "
                                     "--importance-weight).")
    importance_weight: bool = _opt(False, "Weight each token by min(π_θ/π_rollout, clip), detached: for rollouts "
                                          "from another engine or reused across updates.")
    is_clip: float = _opt(2.0, "Upper clip of the importance weight.")
    loss_chunk_size: int = _opt(256, "Response tokens per chunk of the vocabulary projection (bounds loss memory).")

    # teacher
    teacher: str = _opt("ema", "Teacher weights: `ema` (moving average of the student), `frozen` (the starting "
                               "weights), `current` (the live student; collapses, kept for ablation), `trust-region` "
                               "(frozen logits moved toward the student's by --teacher-rate). With LoRA, frozen = "
                               "the base with the adapter off and ema = a moving average of the adapter alone.")
    teacher_rate: float = _opt(0.05, "EMA rate (teacher ← (1−r)·teacher + r·student after each update) or the "
                                     "trust-region mixing weight.")

    # views the student already reads well
    crop_anchor: float = _opt(0.0, "Weight of the crop anchor: KL(starting model ‖ student) on the crop view, at the "
                                   "same response tokens, added to the loss so that training on the full view does "
                                   "not bend the crop view (0 = off). Costs one more student forward and backward.")
    replay: float = _opt(0.0, "Share of each batch drawn from cases the model already answers right on both views "
                              "(gap-report's both_right.jsonl, next to the failures.jsonl given as --data); 0 = off.")

    # optimisation
    steps: int | None = _opt(None, "Optimizer steps; none = one pass over the prompts.")
    batch_size: int = _opt(16, "Prompts per step (each gets --n-rollouts responses).")
    micro_batch_size: int = _opt(32, "Sequences per forward/backward pass; gradients accumulate over a step. "
                                     "Rounded down to whole prompts.")
    lr: float = _opt(2e-6, "Peak learning rate of AdamW (the reference run uses 2e-6 for a 4B model).")
    warmup_steps: int = _opt(10, "Linear warm-up steps, then constant.")
    weight_decay: float = _opt(0.01, "AdamW weight decay.")
    grad_clip: float = _opt(1.0, "Gradient-norm clip.")

    # modes
    lora: bool = _opt(False, "Train a LoRA adapter (PEFT) instead of all weights.")
    lora_rank: int = _opt(16, "LoRA rank.")
    lora_alpha: int = _opt(32, "LoRA scaling alpha.")
    lora_targets: str = _opt("all-linear", "Modules that get an adapter: `all-linear` or comma-separated names.")
    prefix_sharing: bool = _opt(True, "Run each prompt's image and question once through the language model and "
                                      "its n responses against that cache, for teacher and student (2·(P+n·R) "
                                      "tokens instead of 2·n·(P+R)); same losses and gradients. Families not yet "
                                      "proven exact (all but Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) fall back to "
                                      "the plain path and say so once. In a single process, when a step's prompts "
                                      "fit one micro-batch, the HF rollouts also continue from the student's own "
                                      "prefill (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): one prompt pass fewer per step.")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass to save memory (prefix "
                                               "sharing still applies: the cache is kept).")
    device: str = _opt("auto", "Device: auto, cpu, cuda, cuda:1, ...")
    dtype: str = _opt("float32", "Weight dtype: float32 (master weights; bf16 autocast on a GPU) or bfloat16.")
    trust_remote_code: bool = _opt(False, "Allow the model's own code from the hub to run.")
    threads: int | None = _opt(None, "CPU threads for torch (none = torch's default, one per core). A tiny model "
                                     "on a busy CPU is far faster on 1.")

    # bookkeeping
    seed: int = _opt(0, "Seed of data order, rollout sampling and initialisation.")
    profile: bool = _opt(False, "Time the teacher and student phases of every step on a GPU too (it waits for the "
                                "GPU after each phase, a host sync per micro-batch that slows the step). On a CPU "
                                "they are always timed.")
    dist_timeout: float = _opt(30.0, "Under torchrun: minutes a rank waits for the others in a collective before "
                                     "the run stops with an error (a rank that died or hangs shows up then). It "
                                     "covers the longest wait of a healthy run too: rank 0 writing OUT/model, the "
                                     "ranks of the re-measure finishing their shares at different times.")
    save_every: int = _opt(50, "Save the resumable training state every this many steps (and at the end).")
    restart: bool = _opt(False, "Ignore a saved state in --out and start over.")
    quiet: bool = _opt(False, "No live display; one line per --log-every steps.")
    log_every: int = _opt(10, "Print a line every this many steps when not live.")

    # validation during training, best checkpoint
    eval_every: int | None = _opt(None, "Evaluate the model in place every this many steps (and before the first "
                                        "and after the last): accuracy on the full, crop and box views of "
                                        "--eval-benchmarks, logged, plotted and printed. None = no evaluation.")
    eval_benchmarks: str = _opt("", "Comma-separated validation benchmarks of --eval-every; none = synthetic:validation "
                                    "when training on synthetic data.")
    eval_limit: int | None = _opt(None, "Ask at most this many samples per validation benchmark.")
    keep_best: str = _opt("mean_full_crop", "With --eval-every, OUT/model gets the evaluated weights that score "
                                            "highest: `mean_full_crop` (mean of full and crop accuracy), `full` "
                                            "(full accuracy) or `last` (the last weights, no selection).")
    keep_last: bool = _opt(False, "Also write the last weights to OUT/model_last when OUT/model holds the best.")
    eval_batch_size: int = _opt(16, "Batch size of the evaluations and the re-measure.")
    eval_max_new_tokens: int = _opt(32, "Longest answer in the evaluations and the re-measure.")

    # re-measure
    remeasure: bool = _opt(True, "After training, run gap-report on the held-out split for the starting model and "
                                 "the result, and write before_after.csv.")
    remeasure_benchmarks: str = _opt("", "Comma-separated held-out benchmarks for the re-measure; none = the "
                                         "synthetic test split when training on synthetic data.")
    remeasure_limit: int | None = _opt(None, "Ask at most this many samples per held-out benchmark in the re-measure.")
    focus: bool = _opt(False, "Re-measure with gap-report --focus: before_after.csv also compares the attention "
                              "on the evidence (focus_<view> rows) before and after.")

    def validate(self) -> DistillConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise VopdError(msg)

        need(bool(self.model), "a model is required")
        need(bool(self.data), "--data is required")
        need(bool(self.out), "--out is required")
        need(self.teacher in TEACHERS, f"--teacher must be one of {', '.join(TEACHERS)}")
        need(self.student_view in STUDENT_VIEWS, f"--student-view must be one of {', '.join(STUDENT_VIEWS)}")
        need(self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}")
        need(self.reduction in REDUCTIONS, f"--reduction must be one of {', '.join(REDUCTIONS)}")
        need(0.0 <= self.alpha <= 1.0, "--alpha must be in [0, 1]")
        need(0.0 <= self.teacher_rate <= 1.0, "--teacher-rate must be in [0, 1]")
        need(self.topk >= 0, "--topk must be ≥ 0 (0 = full vocabulary)")
        need(self.temperature > 0, "--temperature must be positive")
        for name in ("n_rollouts", "max_new_tokens", "batch_size", "micro_batch_size", "updates_per_batch",
                     "loss_chunk_size", "save_every", "log_every", "lora_rank", "eval_batch_size", "eval_max_new_tokens"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be ≥ 1")
        need(self.steps is None or self.steps >= 1, "--steps must be ≥ 1")
        need(self.dist_timeout > 0, "--dist-timeout must be positive (minutes)")
        need(self.threads is None or self.threads >= 1, "--threads must be ≥ 1")
        need(self.lr > 0 and self.warmup_steps >= 0 and self.grad_clip > 0 and self.is_clip > 0,
             "--lr, --grad-clip and --is-clip must be positive and --warmup-steps ≥ 0")
        need(self.dtype in ("float32", "bfloat16"), "--dtype must be float32 or bfloat16")
        need(self.rollout_engine in ROLLOUT_ENGINES, f"--rollout-engine must be one of {', '.join(ROLLOUT_ENGINES)}")
        need(0 < self.vllm_gpu_memory_utilization <= 1, "--vllm-gpu-memory-utilization must be in (0, 1]")
        need(self.vllm_tensor_parallel_size >= 1, "--vllm-tensor-parallel-size must be ≥ 1")
        need(self.vllm_max_model_len is None or self.vllm_max_model_len >= 1, "--vllm-max-model-len must be ≥ 1")
        need(self.vllm_dtype in ("auto", "float32", "bfloat16", "float16"),
             "--vllm-dtype must be auto, float32, bfloat16 or float16")
        need(self.sync_bucket_mb > 0, "--sync-bucket-mb must be positive")
        need(self.eval_every is None or self.eval_every >= 1, "--eval-every must be ≥ 1")
        need(self.keep_best in KEEP_BEST, f"--keep-best must be one of {', '.join(KEEP_BEST)}")
        need(self.crop_anchor >= 0, "--crop-anchor must be ≥ 0")
        need(0.0 <= self.replay < 1.0, "--replay must be in [0, 1)")
        need(self.replay == 0 or self.batch_size >= 2, "--replay needs --batch-size ≥ 2 (one mined, one replayed)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def option_fields(cls) -> list:
        """The fields that are options (everything but MODEL)."""
        return [f for f in fields(cls) if not f.metadata.get("positional")]


# Fields that do not change the trained weights: a resumed run may change them freely.
# The evaluation settings are not among them: a resumed run compares its evaluations with the best so far.
NOT_TRAINING = {"data_dir", "restart", "quiet", "log_every", "save_every", "remeasure", "remeasure_benchmarks",
                "remeasure_limit", "keep_last", "out", "threads", "vllm_gpu_memory_utilization", "vllm_sleep_mode",
                "focus", "profile", "dist_timeout", "sync_bucket_mb", "vllm_eager",
                "vllm_tensor_parallel_size"}

# Settings tuned on the toy (see benchmarks/README.md and the report of the tuning runs). They apply only when
# MODEL is `toy`, before any YAML file or flag, and are printed and recorded in the run's config.yaml.
TOY_PRESET: dict[str, Any] = {
    "teacher": "frozen",
    "lora": True,
    "lr": 1e-3,
    "steps": 300,
    "batch_size": 32,
    "n_rollouts": 1,
    "micro_batch_size": 32,
    "max_new_tokens": 4,
    "warmup_steps": 10,
    "topk": 0,
    "threads": 1,
    "eval_every": 50,
    "eval_limit": 128,
    # What keeps the crop view (the one the toy reads well) where it was while the full view trains. Without it
    # the crop view swings between 83 and 100 on validation as the full view trains, and where a run ends up
    # depends on which step keep-best lands on: one process kept a step at crop 100, 2 ranks (whose float
    # rounding differs) one at 93.0 and lost 8.7 points on synthetic:test. With it, crop stayed at 100.0 at
    # every validation and on synthetic:test (docs/results/scale.md). Replay did not hold it.
    "crop_anchor": 0.3,
}
# On mined failures (a gap-report failures.jsonl) the toy also gets twice the learning rate for half the steps, so
# that the README's three-command loop ends in under 20 minutes on a 2-core CPU (benchmarks/README.md, "Training
# on mined failures").
TOY_FAILURES_PRESET: dict[str, Any] = {"lr": 2e-3, "steps": 150}


def preset_for(model: str, data: str = "") -> dict[str, Any]:
    if model != "toy":
        return {}
    path = Path(data).expanduser() if data else None
    mined = path is not None and path.suffix == ".jsonl" and path.is_file()
    return {**TOY_PRESET, **(TOY_FAILURES_PRESET if mined else {})}


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise VopdError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise VopdError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise VopdError(f"{p}: expected a mapping of option names to values")
    known = {f.name for f in fields(DistillConfig)}
    raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise VopdError(f"{p}: unknown option(s) {', '.join(unknown)}")
    return raw


def resolve(model: str, overrides: dict[str, Any], config_file: str | None = None) -> tuple[DistillConfig, dict]:
    """Build the config: defaults < toy preset < YAML < `overrides` (None = not given). Returns it and the preset
    values that ended up in force (for printing and recording)."""
    given = load_yaml(config_file) if config_file else {}
    given.update({k: v for k, v in overrides.items() if v is not None})
    preset = preset_for(model, str(given.get("data") or ""))
    values: dict[str, Any] = {**preset, **given}
    values["model"] = model
    cfg = DistillConfig(**_coerce(values)).validate()
    in_force = {k: v for k, v in preset.items() if getattr(cfg, k) == v}
    return cfg, in_force


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """YAML gives ints where floats are wanted (lr: 1e-4 is a str in YAML 1.1); make the types right."""
    out = {}
    types = {f.name: f for f in fields(DistillConfig)}
    for k, v in values.items():
        f = types[k]
        default = f.default if f.default is not MISSING else None
        try:
            if isinstance(default, bool) and not isinstance(v, bool):
                raise VopdError(f"option {k} must be true or false, got {v!r}")
            if isinstance(default, float) and isinstance(v, (int, str)) and not isinstance(v, bool):
                v = float(v)
            elif k in ("steps", "data_limit", "eval_limit", "remeasure_limit", "eval_every", "threads",
                       "vllm_max_model_len") and v is not None:
                v = int(v)
        except ValueError:
            raise VopdError(f"option {k}: cannot read {v!r} as a number") from None
        out[k] = v
    return out


def save_yaml(cfg: DistillConfig, path: Path, extra: dict[str, Any] | None = None) -> None:
    import yaml

    body = cfg.to_dict()
    if extra:
        body = {**body, **extra}
    path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True), encoding="utf-8")
