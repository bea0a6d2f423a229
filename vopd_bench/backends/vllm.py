"""The `vllm` backend: vLLM's offline engine (`vllm.LLM`), for throughput on GPUs.

Every request is one chat turn, the image first and then the question, sent through `LLM.chat` so the model's
own chat template and multimodal processor apply, as they do in the `hf` backend and behind a vLLM server.
Decoding is greedy by default (temperature 0). vLLM is imported only when this backend is built; install it
with `pip install 'vopd[vllm]'`.

Decoding follows `decoding_settings`, as in the `hf` backend: the model's generation_config sampling defaults do
not apply (`generation_config="vllm"`, every sampling field explicit).

Checked against the vLLM 0.33.0 source (tests/test_vllm_conformance.py runs against the real package): `LLM(...)`,
`LLM.chat(conversations, sampling_params, use_tqdm=..., chat_template_kwargs=...)` with `image_pil` content parts,
`SamplingParams(temperature, top_p, top_k, repetition_penalty, max_tokens, seed)`, `VLLMValidationError`. The
tests drive it through tests/fake_vllm.py, which follows that API; it has not run on a GPU in this repository.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vopd_bench.backends.base import GenerationConfig, Request, Response, decoding_settings
from vopd_bench.context import for_vllm
from vopd_bench.errors import VopdError
from vopd_bench.modeling import first_line, resolve_model_path, say_once

# vLLM's SamplingParams rejects a temperature above 2 and silently raises one in (0, 0.01) to 0.01.
MAX_TEMPERATURE = 2.0
MIN_SAMPLING_TEMPERATURE = 0.01


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, max_model_len: int | None = None,
                 seed: int = 0, gpu_memory_utilization: float = 0.9, dtype: str = "auto",
                 trust_remote_code: bool = False, batch_size: int = 16, engine: Any = None,
                 mm_processor_kwargs: dict[str, Any] | None = None, enforce_eager: bool = False, **_: Any):
        if tensor_parallel_size < 1:
            raise VopdError("--tensor-parallel-size must be at least 1")
        if max_model_len is not None and max_model_len < 1:
            raise VopdError("--max-model-len must be positive")
        if not 0 < gpu_memory_utilization <= 1:
            raise VopdError("gpu_memory_utilization must be in (0, 1]")
        self.model_name = model
        self.path = resolve_model_path(model)
        self.dtype = dtype
        # vLLM schedules its own batches: hand it plenty at once, the runner waits for each batch to finish.
        self.preferred_batch_size = max(batch_size, 256)
        self.engine_args: dict[str, Any] = {
            "model": self.path,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "trust_remote_code": trust_remote_code,
            "limit_mm_per_prompt": {"image": 1},  # one image per prompt: no memory reserved for more
            "enforce_eager": enforce_eager,
            "generation_config": "vllm",  # decoding_settings is the whole policy, as in the hf backend
        }
        if max_model_len is not None:
            self.engine_args["max_model_len"] = max_model_len
        if mm_processor_kwargs:
            self.engine_args["mm_processor_kwargs"] = dict(mm_processor_kwargs)
        self.llm = engine if engine is not None else _start_engine(self.engine_args)
        self.prompt_length = for_vllm(self.llm, self.path, trust_remote_code=trust_remote_code)  # runner checks
        self._fingerprint: str | None = None
        self.batch_splits = 0  # calls that failed and were retried request by request (run.json counts them)

    def fingerprint(self) -> str:
        """The weights (as the `hf` backend hashes them) plus vLLM and the dtype: vLLM's kernels and a different
        dtype change answers, so its records never mix with those of another backend."""
        if self._fingerprint is None:
            from vopd_bench.backends.hf import model_fingerprint

            if Path(self.path).expanduser().is_dir():
                weights = model_fingerprint(self.path)
            else:
                snapshot = _hub_snapshot(self.path)  # the hub cache names a snapshot folder by its commit
                weights = f"hub:{self.path}@{Path(snapshot).name if snapshot else 'unknown'}"
            self._fingerprint = f"vllm:{weights}:{self.dtype}"
        return self._fingerprint

    def generate(self, requests: Sequence[Request], gen: GenerationConfig) -> list[Response]:
        if not requests:
            return []
        check_temperature(gen.temperature, "the temperature")
        try:
            return self._generate(requests, gen)
        except Exception as e:  # noqa: BLE001 - one bad prompt (e.g. VLLMValidationError: too long) fails the call
            cause = f"{type(e).__name__}: {first_line(e)}"
            if len(requests) == 1:
                return [Response("", error=cause)]
            self.batch_splits += 1
            say_once(f"vllm-split:{id(self)}", f"a batch of {len(requests)} requests failed ({cause}); its requests "
                     "are retried one at a time to isolate the failing one (slower; run.json counts such splits)")
            return [r for req in requests for r in self.generate([req], gen)]

    def _generate(self, requests: Sequence[Request], gen: GenerationConfig) -> list[Response]:
        import time

        start = time.perf_counter()
        outputs = self.llm.chat([conversation(r) for r in requests], sampling_params=sampling_params(gen),
                                use_tqdm=False, chat_template_kwargs=dict(gen.chat_template_kwargs) or None)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        per = (time.perf_counter() - start) / len(requests)
        return [Response(out.outputs[0].text.strip(), seconds=per, tokens=_n_tokens(out.outputs[0])) for out in outputs]

    def close(self) -> None:
        # Dropping the engine shuts down its worker processes and frees the GPU memory for what runs next.
        self.llm = None
        gc.collect()


def _n_tokens(completion: Any) -> int | None:
    ids = getattr(completion, "token_ids", None)
    return len(ids) if ids is not None else None


def conversation(request: Request) -> list[dict[str, Any]]:
    """One user turn: the image(s) (as PIL images, no re-encoding) before the question."""
    return [{"role": "user", "content": [*({"type": "image_pil", "image_pil": im} for im in request.images),
                                         {"type": "text", "text": request.prompt}]}]


def sampling_params(gen: GenerationConfig) -> Any:
    """`decoding_settings` as vLLM's SamplingParams: greedy at temperature 0, else plain sampling, seeded."""
    from vllm import SamplingParams

    d = decoding_settings(gen)
    return SamplingParams(temperature=d["temperature"], top_p=d["top_p"], top_k=0 if d["top_k"] is None else d["top_k"],
                          repetition_penalty=d["repetition_penalty"], max_tokens=d["max_new_tokens"], seed=d["seed"])


def check_temperature(temperature: float, name: str) -> None:
    """Refuse, before any engine work, a temperature vLLM would reject or silently change."""
    if temperature > MAX_TEMPERATURE or 0 < temperature < MIN_SAMPLING_TEMPERATURE:
        raise VopdError(f"{name} {temperature} is outside what vLLM samples at: 0 (greedy) or "
                        f"{MIN_SAMPLING_TEMPERATURE} to {MAX_TEMPERATURE}")


def vllm_validation_errors() -> tuple[type[BaseException], ...]:
    """The exception classes vLLM raises for a request it rejects: `VLLMValidationError` (vLLM ≥ 0.12, no longer a
    ValueError) and ValueError (older releases and plain checks)."""
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:
        return (ValueError,)
    return (VLLMValidationError, ValueError)


def _start_engine(engine_args: dict[str, Any]) -> Any:
    try:
        from vllm import LLM
    except ImportError:
        raise VopdError("the vllm backend needs vLLM: pip install 'vopd[vllm]' (Linux with a CUDA GPU)") from None
    try:
        return LLM(**engine_args)
    except Exception as e:  # noqa: BLE001 - any start-up failure is a run-level error with one readable line
        raise VopdError(f"vLLM could not load {engine_args['model']!r}: {type(e).__name__}: {first_line(e)}") from None


def _hub_snapshot(repo_id: str) -> str | None:
    """The hub cache's local snapshot folder of `repo_id`, without downloading anything."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached or not a repo id: the fingerprint says "unknown"
        return None


__all__ = ["VLLMBackend", "check_temperature", "conversation", "sampling_params", "vllm_validation_errors"]
