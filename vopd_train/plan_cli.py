"""`vopd check MODEL --plan --gpus N --gpu-memory GIB [distill options]`: the memory plan, from the command line.

The distill options are `vopd distill`'s own (`vopd_train.cli._option_params`, one per `DistillConfig` field) and
resolve exactly as there (defaults < toy preset < `--config` YAML < flags), so a plan describes the run that the same
flags would launch. `--data` and `--out` are not asked for: they do not change the memory.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any

import typer

from vopd_bench.errors import VopdError

# `vopd check` already has these three; its own options serve both the check and the plan.
SHARED_WITH_CHECK = ("trust_remote_code", "device", "threads")
NOT_MEMORY = ("data", "out")


def plan_params() -> list[inspect.Parameter]:
    """The options `--plan` adds to `vopd check`: the hardware, the prompt size, and every distill option."""
    from vopd_train.cli import _option_params

    def opt(name: str, annotation: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    own = [
        opt("plan", bool, typer.Option(False, "--plan", help="Print the per-GPU memory plan of the `vopd distill` "
                                       "run these options describe, from the model's config alone (no weights), "
                                       "instead of running the checks.")),
        opt("gpus", typing.Optional[int], typer.Option(None, "--gpus", help="--plan: GPUs of the run "  # noqa: UP045
                                                       "(torchrun ranks, one per GPU). [default: 1]")),
        opt("gpu_memory", typing.Optional[float], typer.Option(None, "--gpu-memory", help="--plan: memory of one "  # noqa: UP045
                                                               "GPU in GiB (an 80 GB H100 reports 79.6). [default: none; required with --plan]")),
        opt("model_config", typing.Optional[Path], typer.Option(None, "--model-config", help="--plan: the model's "  # noqa: UP045
                                                                "config.json (or a folder with one) when MODEL is a hub "
                                                                "id that is not downloaded. [default: MODEL's own]")),
        opt("prompt_tokens", typing.Optional[int], typer.Option(None, "--prompt-tokens", help="--plan: tokens of "  # noqa: UP045
                                                                "the longest prompt, its image included. [default: 1200]")),
        opt("image_tokens", typing.Optional[int], typer.Option(None, "--image-tokens", help="--plan: the image's "  # noqa: UP045
                                                               "tokens in that prompt. [default: 1024]")),
        opt("config", typing.Optional[Path], typer.Option(None, "--config", help="--plan: YAML file of distill "  # noqa: UP045
                                                          "options, as for `vopd distill --config`. [default: none]")),
    ]
    distill = [p for p in _option_params() if p.name not in SHARED_WITH_CHECK + NOT_MEMORY]
    return own + distill


def given_plan_options(options: dict[str, Any]) -> list[str]:
    """The plan options given on the command line (to refuse them without --plan)."""
    return [k for k, v in options.items() if k != "plan" and v is not None]


def run_plan(model: str, options: dict[str, Any], *, trust_remote_code: bool | None, device: str | None,
             threads: int | None, echo: Any = print) -> bool:
    """Resolve the options as `vopd distill` does, plan, print. Returns whether the run fits."""
    from vopd_train.config import resolve
    from vopd_train.plan import Setting, advise, load_model_config, plan_memory, render

    options = dict(options)
    options.pop("plan", None)
    gpus = options.pop("gpus")
    gpu_memory = options.pop("gpu_memory")
    model_config = options.pop("model_config")
    prompt_tokens = options.pop("prompt_tokens")
    image_tokens = options.pop("image_tokens")
    config_file = options.pop("config")
    if gpu_memory is None:
        raise VopdError("--plan needs --gpu-memory (GiB per GPU)")
    overrides = {**options, "trust_remote_code": trust_remote_code, "device": device, "threads": threads,
                 "data": "(plan)", "out": "(plan)"}
    cfg, _ = resolve(model, overrides, str(config_file) if config_file else None)
    setting = Setting(gpus=1 if gpus is None else gpus, gpu_gib=gpu_memory,
                      prompt_tokens=1200 if prompt_tokens is None else prompt_tokens,
                      image_tokens=1024 if image_tokens is None else image_tokens).check()
    mc = load_model_config(model, str(model_config) if model_config else None, cfg.trust_remote_code)
    layouts: dict = {}
    plan = plan_memory(model, mc, cfg, setting, layouts)
    steps, fixed = advise(plan, mc, layouts) if not plan.fits else ([], plan)
    echo(render(plan, steps, fixed))
    return plan.fits


__all__ = ["given_plan_options", "plan_params", "run_plan"]
