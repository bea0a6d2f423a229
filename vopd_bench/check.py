"""`vopd check MODEL`: a preflight that tells, in a minute, whether a model works with vopd before a long job.

It loads the model once for gap-report and once per distill run, on tiny workloads in a scratch folder:

    load              the model and its processor load through AutoModelForImageTextToText / AutoProcessor
    gap-report        2 samples of synthetic:test, every view, batched (batch size 2): no per-sample error, no
                      batch that had to be split
    vLLM requests     each rollout request (chat text + image) re-encodes to exactly the trainer's prompt ids, and
                      every banned vision token is one token (what vLLM's checks and `bad_words` need)
    vision fast path  the image once per prompt for all its rollouts gives the same hidden states as the plain path
                      ("not available" is not a failure: the plain path is used, and said so)
    distill full      one step of full fine-tuning on 2 prompts × 2 rollouts, 4 new tokens: finite loss and gradient
    distill LoRA      the same with a LoRA adapter

Each capability is one line: `ok`, or the first line of the reason.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vopd_bench.errors import VopdError
from vopd_bench.modeling import first_line

CAPABILITIES = ("load", "gap-report", "vLLM requests", "vision fast path", "distill full", "distill LoRA")


@dataclass(frozen=True)
class CheckLine:
    capability: str
    ok: bool
    detail: str  # "ok", or the first line of the reason
    required: bool = True  # a capability that may be missing without failing the check (the fast path)

    def render(self) -> str:
        return f"{self.capability:<17} {self.detail}"


def run_check(model: str, *, work_dir: str | Path | None = None, trust_remote_code: bool = False,
              device: str | None = None, threads: int | None = None,
              on_line: Callable[[CheckLine], None] | None = None) -> list[CheckLine]:
    """Check every capability of `model`; `on_line` sees each line as soon as it is known."""
    lines: list[CheckLine] = []

    def emit(line: CheckLine) -> None:
        lines.append(line)
        if on_line is not None:
            on_line(line)

    with tempfile.TemporaryDirectory(prefix="vopd-check-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        from vopd_bench.backends.hf import HFBackend

        try:
            backend = HFBackend(model, device=device, trust_remote_code=trust_remote_code, batch_size=2, threads=threads)
        except VopdError as e:
            emit(CheckLine("load", False, str(e)))
            for name in CAPABILITIES[1:]:
                emit(CheckLine(name, False, "skipped: the model did not load"))
            return lines
        emit(CheckLine("load", True, f"ok ({type(backend.model).__name__})"))
        emit(_attempt("gap-report", lambda: _gap_report(model, backend, root / "gap-report")))
        emit(_attempt("vLLM requests", lambda: _vllm_requests(backend)))
        emit(_vision_fast_path(backend))
        backend.close()
        for lora in (False, True):
            name = "distill LoRA" if lora else "distill full"
            out = root / ("distill-lora" if lora else "distill-full")
            emit(_attempt(name, lambda out=out, lora=lora: _distill(model, out, lora, trust_remote_code, device, threads)))
    return lines


def _attempt(name: str, fn: Callable[[], str | None]) -> CheckLine:
    """Run one capability: a returned string is its failure reason; an exception's first line is too."""
    try:
        problem = fn()
    except VopdError as e:
        return CheckLine(name, False, first_line(e) or type(e).__name__)
    except Exception as e:  # noqa: BLE001 - any failure of a capability is reported as its one line
        return CheckLine(name, False, f"{type(e).__name__}: {first_line(e)}")
    return CheckLine(name, problem is None, problem or "ok")


def _gap_report(model: str, backend: Any, out: Path) -> str | None:
    from vopd_bench.runner import GapReportConfig, run_gap_report

    cfg = GapReportConfig(model=model, benchmarks=["synthetic:test"], limit=2, batch_size=2, max_new_tokens=8,
                          out=str(out), quiet=True, force=True)
    result = run_gap_report(cfg, backend=backend)
    errors = [r.error for r in result.records if r.error]
    if errors:
        return f"{len(errors)} of {len(result.records)} requests failed: {errors[0]}"
    if backend.batch_splits:
        return f"{backend.batch_splits} batch(es) had to be split into single requests"
    return None


def _sample_prompts(processor: Any) -> list[Any]:
    from PIL import Image

    from vopd_train.rollout import encode_prompts

    images = [Image.new("RGB", (224, 224), (200, 30, 30)), Image.new("RGB", (160, 96), (30, 60, 200))]
    return encode_prompts(processor, images, ["What colour is the object?", "What shape is it? (A) circle (B) square"])


def _vllm_requests(backend: Any) -> str | None:
    from vopd_bench.modeling import vision_token_ids
    from vopd_train.rollout_vllm import vllm_request

    processor = backend.processor
    for i, prompt in enumerate(_sample_prompts(processor)):
        request = vllm_request(prompt)
        again = processor(text=[request["prompt"]], images=[[request["multi_modal_data"]["image"]]],
                          return_tensors="pt")["input_ids"][0]
        if again.tolist() != prompt.input_ids.tolist():
            return (f"prompt {i}: the request's chat text and image encode to {len(again)} tokens, the trainer's "
                    f"prompt has {len(prompt.input_ids)}")
    tok = processor.tokenizer
    for token_id in vision_token_ids(processor, backend.model.config):
        text = tok.convert_ids_to_tokens(token_id)
        if tok(text, add_special_tokens=False)["input_ids"] != [token_id]:
            return f"the vision token {text!r} is not one token when vLLM tokenises it, so it cannot be banned"
    return None


def _vision_fast_path(backend: Any) -> CheckLine:
    name = "vision fast path"
    try:
        import torch

        from vopd_train.rollout import build_sequences, model_family, response_hidden, why_no_vision_once

        family = model_family(backend.model)
        why_not = why_no_vision_once(backend.model, family)
        if why_not:
            return CheckLine(name, False, f"not available: {why_not}; each rollout's image is encoded separately "
                                          "(slower, same result)", required=False)
        prompts = _sample_prompts(backend.processor)
        words = backend.processor.tokenizer("The answer is A", add_special_tokens=False)["input_ids"]
        responses = [words[:2], words[:1], words]
        batch = build_sequences(prompts, responses, [0, 0, 1], 0, family).to(backend.model.device)
        with torch.no_grad():
            fast = response_hidden(backend.model, batch, vision_once=True).float()
            plain = response_hidden(backend.model, batch, vision_once=False).float()
        diff = float((fast - plain).abs().max())
        scale = float(plain.abs().max()) or 1.0
        if not diff <= 1e-3 * scale:
            return CheckLine(name, False, f"hidden states differ from the plain path by {diff:.3g} (of {scale:.3g})")
        return CheckLine(name, True, "ok")
    except Exception as e:  # noqa: BLE001 - reported as the capability's one line
        return CheckLine(name, False, f"{type(e).__name__}: {first_line(e)}")


def _distill(model: str, out: Path, lora: bool, trust_remote_code: bool, device: str | None,
             threads: int | None) -> str | None:
    try:
        from vopd_train.config import DistillConfig
        from vopd_train.trainer import Distiller
    except ImportError as e:
        return f"the trainer is not installed ({e})"
    cfg = DistillConfig(model=model, data="synthetic:train", out=str(out), data_limit=2, steps=1, batch_size=2,
                        n_rollouts=2, max_new_tokens=4, lora=lora, restart=True, trust_remote_code=trust_remote_code,
                        device=device or "auto", threads=threads)
    result = Distiller(cfg).train()
    row = result.history[-1] if result.history else None
    if row is None or not row["tokens"]:
        return "no rollout tokens were scored"
    if not (math.isfinite(row["divergence"]) and math.isfinite(row["grad_norm"])):
        return f"non-finite loss or gradient (divergence {row['divergence']}, gradient norm {row['grad_norm']})"
    return None


__all__ = ["CAPABILITIES", "CheckLine", "run_check"]
