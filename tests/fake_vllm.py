"""A stand-in for the parts of the `vllm` package vopd calls, built from the vLLM 0.33.0 source.

Names, where they live, parameter names, kinds and defaults, return types and exception classes follow the real
package; tests/test_vllm_conformance.py compares every signature here with the real one wherever vLLM is
importable, so this file cannot drift from it unnoticed. Behaviour follows the in-process engine on one GPU
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, tensor parallel size 1), the layout vopd supports:

- `collective_rpc(method, timeout, args, kwargs)` calls `method(worker, *args, **kwargs)` directly and returns a
  one-element list. The worker's `reload_weights(weights_iterator, weights_path, is_checkpoint_format)` hands the
  iterator to the model's `load_weights`, as vLLM's in-place reload does. A callable must also survive `pickle.dumps` (a module-level function is pickled by reference):
  any other layout cloudpickles it to other processes, and a local closure fails there.
- `sleep(level, mode)`, `wake_up(tags) -> bool` (whether the engine is fully awake),
  `reset_prefix_cache(...) -> bool`, `reset_mm_cache() -> None`; the encoder cache is reset on `llm_engine`.
- `SamplingParams` validates as vLLM's does: a temperature above 2 raises `VLLMValidationError`, which is not a
  ValueError.
"""

from __future__ import annotations

import pickle
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------- vllm.exceptions


class VLLMError(Exception):
    pass


class VLLMClientError(VLLMError):
    pass


class VLLMValidationError(VLLMClientError):
    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value


# ---------------------------------------------------------------------- vllm.sampling_params


@dataclass
class SamplingParams:
    """The fields vopd sets, with vLLM's defaults; an unknown keyword is a TypeError, as in vLLM."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    detokenize: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise VLLMValidationError(f"temperature must be in [0, 2], got {self.temperature}.",
                                      parameter="temperature", value=self.temperature)
        if 0 < self.temperature < 1e-2:  # vLLM raises it silently (a log warning)
            self.temperature = 1e-2
        if self.stop_token_ids is None:  # vLLM turns both into empty lists
            self.stop_token_ids = []
        if self.bad_words is None:
            self.bad_words = []


# ---------------------------------------------------------------------- vllm.logprobs, vllm.outputs


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool = True


def completion(token_ids: Sequence[int], logprobs: list[float] | None = None, text: str = "",
               index: int = 0) -> CompletionOutput:
    steps = None if logprobs is None else [{t: Logprob(v)} for t, v in zip(token_ids, logprobs, strict=True)]
    return CompletionOutput(index, text, list(token_ids), None if logprobs is None else sum(logprobs), steps)


# ---------------------------------------------------------------------- the worker and vllm.LLM


class Worker:
    """vLLM's GPU worker, as `collective_rpc` hands it to a function: `get_model()` is its public model;
    `reload_weights` has the model runner's signature (the worker forwards `*args, **kwargs` to it)."""

    def __init__(self, model: Any):
        self._model = model

    def get_model(self) -> Any:
        return self._model

    def reload_weights(self, weights_iterator: Any = None, weights_path: str | None = None,
                       is_checkpoint_format: bool = True) -> None:
        assert weights_iterator is not None and is_checkpoint_format, "vopd streams checkpoint-format weights"
        self._model.load_weights(weights_iterator)


# ---------------------------------------------------------------------- vllm.platforms


class Platform:
    """`vllm.platforms.current_platform`: the device type vLLM detected and whether it can sleep."""

    def __init__(self, device_type: str = "cpu", sleep: bool = False):
        self.device_type = device_type
        self._sleep = sleep

    def is_sleep_mode_available(self) -> bool:
        return self._sleep


class LLMEngine:
    """`LLM.llm_engine`: vopd calls only `reset_encoder_cache` on it."""

    def __init__(self, events: list):
        self._events = events

    def reset_encoder_cache(self) -> None:
        self._events.append(("reset_encoder_cache",))


class LLM:
    """`vllm.LLM`. Subclasses answer requests by overriding `answer(prompt, params) -> RequestOutput` and
    `answer_chat(conversation, params) -> RequestOutput`; `model` is what the worker's `get_model()` returns."""

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.92, trust_remote_code: bool = False, enforce_eager: bool = False,
                 mm_processor_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.kwargs = dict(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                           gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code,
                           enforce_eager=enforce_eager, **kwargs)
        if mm_processor_kwargs is not None:
            self.kwargs["mm_processor_kwargs"] = mm_processor_kwargs
        self.events: list = []
        self.calls: list = []
        self.llm_engine = LLMEngine(self.events)
        self.worker = Worker(None)

    # -- requests
    def generate(self, prompts: Any, sampling_params: Any = None, *, use_tqdm: bool = True,
                 lora_request: Any = None, priority: Any = None, tokenization_kwargs: dict[str, Any] | None = None,
                 mm_processor_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        prompts = prompts if isinstance(prompts, list) else [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.calls.append({"prompts": prompts, "sampling_params": sampling_params, "use_tqdm": use_tqdm})
        return [self.answer(p, sp) for p, sp in zip(prompts, params, strict=True)]

    def chat(self, messages: Any, sampling_params: Any = None, use_tqdm: bool = True, lora_request: Any = None,
             priority: Any = None, chat_template: str | None = None, chat_template_content_format: str = "auto",
             add_generation_prompt: bool = True, continue_final_message: bool = False, tools: Any = None,
             chat_template_kwargs: dict[str, Any] | None = None, tokenization_kwargs: dict[str, Any] | None = None,
             mm_processor_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        self.calls.append({"messages": messages, "sampling_params": sampling_params, "use_tqdm": use_tqdm,
                           "chat_template_kwargs": chat_template_kwargs})
        return [self.answer_chat(conv, sampling_params) for conv in messages]

    def answer(self, prompt: Any, params: SamplingParams) -> RequestOutput:
        raise NotImplementedError

    def answer_chat(self, conversation: Any, params: SamplingParams) -> RequestOutput:
        raise NotImplementedError

    # -- workers
    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        if callable(method):
            pickle.dumps(method)  # a closure or lambda fails here, as it does in every multi-process layout
            result = method(self.worker, *args, **(kwargs or {}))
        else:
            result = getattr(self.worker, method)(*args, **(kwargs or {}))
        self.events.append(("collective_rpc", getattr(method, "__name__", method)))
        return [result]

    def apply_model(self, func: Callable[[Any], Any]) -> list[Any]:
        pickle.dumps(func)
        return [func(self.worker.get_model())]

    # -- caches and memory
    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.events.append(("reset_prefix_cache",))
        return True

    def reset_mm_cache(self) -> None:
        self.events.append(("reset_mm_cache",))

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.events.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.events.append(("wake_up", tags))
        return True


def install(monkeypatch: Any, make_llm: Callable[..., Any], platform: Platform | None = None) -> types.ModuleType:
    """Put a `vllm` package (with `vllm.exceptions` and `vllm.platforms`) into sys.modules whose `LLM(...)` is
    `make_llm(...)`, on `platform` (default: a CPU, no sleep mode)."""
    vllm = types.ModuleType("vllm")
    exceptions = types.ModuleType("vllm.exceptions")
    exceptions.VLLMError, exceptions.VLLMClientError = VLLMError, VLLMClientError
    exceptions.VLLMValidationError = VLLMValidationError
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = platform or Platform()
    vllm.LLM, vllm.SamplingParams, vllm.exceptions, vllm.platforms = make_llm, SamplingParams, exceptions, platforms
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.exceptions", exceptions)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    return vllm
