"""`vopd distill MODEL --data SOURCE --out DIR [options]`.

Every option comes from a `DistillConfig` field and its help text, so the dataclass, the YAML file and `--help`
can never disagree. An option left out keeps its value from the YAML file, then the toy preset, then the default.
"""

from __future__ import annotations

import inspect
import os
import time
import typing
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from vopd_bench.cli_help import VopdCommand
from vopd_train.config import TOY_FAILURES_PRESET, TOY_PRESET, DistillConfig, resolve

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
console = Console()


@app.callback()
def _group() -> None:
    """vopd_train commands (registered into the main `vopd` app as `vopd distill`)."""

HELP = (
    "Close the regional-to-global gap without labels: on-policy self-distillation from the model's own crop view.\n\n"
    "The student (the model on the full image) samples answers; the teacher (the same model on the evidence crop, "
    "same text) scores every token; the student minimises the per-token divergence. Writes OUT/model "
    "(save_pretrained), train_log.jsonl, train_curves.png, a resumable OUT/state (rerun the same command to resume) "
    "and, unless --no-remeasure, before_after.csv comparing gap-report before and after.\n\n"
    "MODEL `toy` gets the settings tuned for it: {toy}. They are printed and recorded in OUT/config.yaml, and any "
    "flag or --config file overrides them."
)


def run_distill(cfg: DistillConfig, preset: dict[str, Any] | None = None, *, engine: Any = None,
                show: Console | None = None) -> dict[str, Any]:
    """Train, save, and re-measure. Returns {"train": TrainResult, "remeasure": Remeasure | None}.
    The output folder is locked for the whole run: a second run on it is refused (the ranks of one torchrun job
    share it). A write that fails (a full disk) stops the run with one line; the saved state resumes."""
    from vopd_bench.errors import writing_to
    from vopd_bench.folder_lock import output_lock

    out = cfg.validate().out
    with writing_to(out), output_lock(out):
        return _run_distill(cfg, preset, engine=engine, show=show)


def _run_distill(cfg: DistillConfig, preset: dict[str, Any] | None, *, engine: Any,
                 show: Console | None) -> dict[str, Any]:
    from vopd_bench import distributed
    from vopd_train.remeasure import held_out_benchmarks, remeasure
    from vopd_train.trainer import Distiller

    out = show or console
    if distributed.place_from_env().rank != 0:  # under torchrun rank 0 alone prints
        out = Console(quiet=True)
    if preset:
        out.print("[bold]toy preset:[/] " + ", ".join(f"{k}={v}" for k, v in preset.items()), highlight=False, soft_wrap=True)
    display = _Display(out, cfg)
    trainer = Distiller(cfg, engine=engine, on_step=display.update, preset=preset, on_eval=display.evaluated,
                        on_note=lambda msg: out.print(msg, highlight=False, soft_wrap=True))
    if trainer.step:
        out.print(f"resuming {cfg.out} at step {trainer.step}/{trainer.total_steps}", highlight=False, soft_wrap=True)
    out.print(f"{len(trainer.data.prompts)} prompts ({len(trainer.skipped)} skipped), {trainer.total_steps} steps, "
              f"teacher {cfg.teacher}, {'LoRA' if cfg.lora else 'full fine-tuning'}, device {trainer.device}",
              highlight=False, soft_wrap=True)
    if trainer.n_replay:
        from vopd_train.data import replay_count

        out.print(f"replay: {trainer.n_replay} both-right cases, {replay_count(cfg.batch_size, cfg.replay)} of "
                  f"every {cfg.batch_size} prompts", highlight=False, soft_wrap=True)
    if trainer.validator is not None:
        kept = "the last weights" if trainer.best is None else f"the best by {cfg.keep_best}"
        out.print(f"evaluating every {cfg.eval_every} steps on {', '.join(trainer.validator.names)} "
                  f"(n={trainer.validator.n_samples}); model/ keeps {kept}", highlight=False, soft_wrap=True)
    display.start(trainer.step, trainer.total_steps)
    try:
        result = trainer.train()
    finally:
        display.stop()
        close = getattr(trainer.engine, "close", None)  # a vLLM engine shuts down while its process groups exist
        if close is not None:
            close()
    out.print(f"model: {result.model_dir}  ({result.seconds:.0f} s)", highlight=False, soft_wrap=True)
    if result.best is not None:
        out.print(f"kept step {result.best.step} of {trainer.step}: {result.best.why()}, "
                  f"{cfg.keep_best} {100 * result.best.score:.1f} ({_eval_text(result.best.metrics)}); "
                  "recorded in config.yaml", highlight=False, soft_wrap=True)

    measured = None
    if cfg.remeasure:
        benches = held_out_benchmarks(trainer.data.kind, trainer.data.benchmarks, cfg.remeasure_benchmarks)
        if not benches:
            out.print("re-measure skipped: no held-out benchmark known for this data; pass --remeasure-benchmarks")
        else:
            del trainer  # free the training copies before two more models are loaded
            measured = remeasure(cfg.model, result.model_dir, benches, Path(cfg.out), limit=cfg.remeasure_limit,
                                 batch_size=cfg.eval_batch_size, max_new_tokens=cfg.eval_max_new_tokens,
                                 trust_remote_code=cfg.trust_remote_code, quiet=cfg.quiet, data_dir=cfg.data_dir,
                                 focus=cfg.focus)
            if measured is not None:  # None on the other ranks of a torchrun job
                print_before_after(measured.table, out)
                out.print(f"before/after: {measured.csv}", highlight=False, soft_wrap=True)
    return {"train": result, "remeasure": measured}


def print_before_after(table, out: Console) -> None:
    from rich.table import Table

    t = Table(title="Before → after (accuracy %, paired 95% CI of the change)")
    for col in ("benchmark", "metric", "before", "after", "change", "95% CI", "n"):
        t.add_column(col, justify="left" if col in ("benchmark", "metric") else "right")
    for r in table[table["category"] == "all"].to_dict("records"):
        t.add_row(r["benchmark"], r["metric"], f"{100 * r['before']:.1f}", f"{100 * r['after']:.1f}",
                  f"{100 * r['delta']:+.1f}", f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]", str(r["n"]))
    out.print(t)


class _Display:
    """A live rich progress bar with the step's metrics; plain lines when quiet or not on a terminal."""

    def __init__(self, out: Console, cfg: DistillConfig):
        self.out, self.cfg = out, cfg
        self.live = not cfg.quiet and out.is_terminal
        self.bar = None
        self.task = None
        self.t0 = time.perf_counter()

    def start(self, done: int, total: int) -> None:
        self.total = total
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[metrics]}"), console=self.out)
            self.bar.start()
            self.task = self.bar.add_task("distill", total=total, completed=done, metrics="")

    def update(self, s: Any) -> None:
        metrics = (f"div {s.divergence:.4f}  agree {s.agree:.2f}  ent {s.entropy:.2f}  len {s.resp_len:.1f}  "
                   f"|g| {s.grad_norm:.3g}  lr {s.lr:.1e}  {s.t_step:.2f}s/step")
        if self.bar is not None:
            self.bar.update(self.task, completed=s.step, metrics=metrics)
        elif s.step % self.cfg.log_every == 0 or s.step == self.total:
            self.out.print(f"step {s.step}/{self.total}  {metrics}", highlight=False, soft_wrap=True)

    def evaluated(self, row: dict) -> None:
        mark = "  ★ best so far" if row.get("best") else ""
        self.out.print(f"eval step {row['step']}/{self.total}: {_eval_text(row)}{mark}", highlight=False,
                       soft_wrap=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _eval_text(m: dict) -> str:
    box = f"  box {100 * m['acc_box']:.1f}" if m.get("acc_box") is not None else ""
    return (f"full {100 * m['acc_full']:.1f}  crop {100 * m['acc_crop']:.1f}{box}  gap {100 * m['gap']:+.1f}  "
            f"mean {100 * m['mean_full_crop']:.1f}  (n={m['n']})")


# The help panels of `vopd distill --help`, in order, and the options in each. A field that none names takes its
# panel from its name's prefix (PANEL_PREFIXES); tests/test_cli_help.py fails for a field that has neither.
PANELS: dict[str, tuple[str, ...]] = {
    "Data": ("data", "data_limit", "data_dir", "student_view", "crop_context", "crop_min_side", "crop_zoom",
             "replay"),
    "Model": ("dtype", "trust_remote_code"),  # and lora_* by prefix
    "Rollouts": ("n_rollouts", "temperature", "max_new_tokens", "rollout_engine"),
    "Loss": ("alpha", "topk", "add_tail", "objective", "reduction", "updates_per_batch", "importance_weight",
             "is_clip", "crop_anchor"),
    "Teacher": ("teacher", "teacher_rate"),
    "Optimiser": ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "grad_clip", "seed"),
    "Evaluation": ("keep_best", "keep_last", "focus"),  # and eval_*, remeasure* by prefix
    "Scale": ("device", "threads", "micro_batch_size", "loss_chunk_size", "gradient_checkpointing",
              "prefix_sharing", "dist_timeout", "profile"),
    "vLLM": ("sync_bucket_mb",),  # and vllm_* by prefix
    "Output": ("out", "save_every", "restart", "quiet", "log_every"),
}
PANEL_PREFIXES = (("vllm_", "vLLM"), ("eval_", "Evaluation"), ("remeasure", "Evaluation"), ("lora", "Model"))
UNSORTED_PANEL = "Other options"  # only for a field added without a panel; the test names it


def panel_of(name: str) -> str:
    for panel, names in PANELS.items():
        if name in names:
            return panel
    return next((panel for prefix, panel in PANEL_PREFIXES if name.startswith(prefix)), UNSORTED_PANEL)


def default_text(value: Any, flag: str | None = None) -> str:
    """A field's default as `--help` shows it: `none` for None or "", the flag's own name for a switch (as Typer
    shows its switches: `lora` or `no-lora`)."""
    if flag is not None:
        return flag if value else f"no-{flag}"
    return "none" if value in (None, "") else str(value)


def _option_params() -> list[inspect.Parameter]:
    """One typer option per config field, in the order of PANELS; every default is None, meaning "not given on
    the command line" (the toy preset and a YAML file come in between), so the help text shows the default."""
    hints = typing.get_type_hints(DistillConfig)
    fields = DistillConfig.option_fields()
    order = [*PANELS, *(p for _, p in PANEL_PREFIXES), UNSORTED_PANEL]
    fields.sort(key=lambda f: order.index(panel_of(f.name)))  # stable: the dataclass order within a panel
    params = []
    for f in fields:
        flag = f.name.replace("_", "-")
        typ = hints[f.name]
        base = next((a for a in typing.get_args(typ) if a is not type(None)), typ)
        switch = base is bool
        suffix = "[required]" if f.name in ("data", "out") else \
            f"[default: {default_text(f.default, flag if switch else None)}]"
        decls = [f"--{flag}/--no-{flag}" if switch else f"--{flag}"]
        if f.name == "quiet":
            decls.append("-q")
        opt = typer.Option(None, *decls, help=f"{f.metadata['help']} {suffix}", show_default=False,
                           rich_help_panel=panel_of(f.name))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                                        annotation=typing.Optional[base]))  # noqa: UP045 - typer needs Optional
    return params


def distill_command(**kwargs: Any) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    model = kwargs.pop("model")
    config_file = kwargs.pop("config")
    cfg, preset = resolve(model, kwargs, str(config_file) if config_file else None)
    run_distill(cfg, preset)


_model_param = inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                                 default=typer.Argument(..., help="Starting model: `toy`, a local folder or a hub id."))
_config_param = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[Path],  # noqa: UP045
                                  default=typer.Option(None, "--config", help="YAML file of options (names as "
                                                       "below, with - or _); flags given here override it."))
distill_command.__signature__ = inspect.Signature([_model_param, _config_param, *_option_params()])  # type: ignore[attr-defined]
distill_command.__annotations__ = {p.name: p.annotation for p in distill_command.__signature__.parameters.values()}  # type: ignore[attr-defined]
_HELP = HELP.format(toy=", ".join(f"{k} {v}" for k, v in TOY_PRESET.items())
                    + "; on a gap-report failures.jsonl also "
                    + ", ".join(f"{k} {v}" for k, v in TOY_FAILURES_PRESET.items()))
distill_command.__doc__ = _HELP
app.command("distill", help=_HELP, cls=VopdCommand)(distill_command)
