"""Rollouts from vLLM's offline engine (`vllm.LLM`), with the trained weights pushed into it after every update.

The engine lives in the training process and on the training GPU (the "colocate" pattern of TRL): it holds its
own copy of the weights, so `sync_weights` has to copy the student into it after each optimizer update.

    generate      each prompt goes to vLLM as the trainer's own chat text plus the PIL image, so vLLM's processor
                  expands the same image placeholder the HF processor did; the prompt ids vLLM reports are checked
                  against the trainer's. One `SamplingParams` per prompt: n samples, the trainer's temperature,
                  no top-k/top-p, vision special tokens banned (`bad_words`), the trainer's EOS ids as stop ids,
                  a seed drawn from torch's generator (which the trainer reseeds every step), and `logprobs=0`:
                  the log-probability of each sampled token, as the sampler saw it (`processed_logprobs`: after
                  the temperature), which the trainer uses as π_rollout in the importance weight.
    sync_weights  the student as `save_pretrained` would write it (checkpoint names, tied copies dropped; with
                  LoRA, only the adapted layers, each merged as W + ΔW), handed to the vLLM model's own
                  `load_weights`, which maps checkpoint names onto its fused layers. Then the prefix and encoder
                  caches are dropped: they hold keys and image features computed with the old weights.

Checked against the vLLM 0.33.0 source (tests/test_vllm_conformance.py runs against the real package): `LLM(...,
logprobs_mode=..., enable_sleep_mode=..., generation_config="vllm")`, `LLM.generate(prompts, sampling_params=list,
use_tqdm=False)`, `SamplingParams(...)`, `LLM.collective_rpc(function, args=...)`, `LLM.reset_prefix_cache`,
`LLM.llm_engine.reset_encoder_cache`, `LLM.sleep(level=1)`, `LLM.wake_up(tags) -> bool`,
`vllm.exceptions.VLLMValidationError`. Only one layout is supported: the engine core in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`) on one GPU (tensor parallel size 1). There `collective_rpc` calls a function
on the worker directly, so the weights are handed over as tensors, never serialised; any other layout is refused
at start-up. The fakes in tests/fake_vllm.py follow that API; the real paths have not run on a GPU in this
repository (benchmarks/vllm_gpu_check.sh is the prepared check).
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from vopd_bench.backends.vllm import check_temperature, vllm_validation_errors
from vopd_bench.errors import VopdError
from vopd_bench.modeling import one_line, resolve_model_path, vision_token_ids
from vopd_train.rollout import EncodedPrompt, Rollout, SamplingSettings

# vLLM tags the memory that `sleep` offloads or drops.
SLEEP_TAGS = ("weights", "kv_cache")
# Level 1 offloads the weights to CPU memory and brings them back on wake-up; level 2 discards them. A LoRA sync
# sends only the adapted layers, so after a level-2 sleep every other layer would be garbage: level 1 it must be.
SLEEP_LEVEL = 1
# The engine core must run in this process: `collective_rpc` then calls the sync function on the worker directly
# (no serialisation of the weights); the multiprocessing core would pickle every tensor of every sync.
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


class VLLMRolloutEngine:
    """A `RolloutEngine` backed by `vllm.LLM`. `llm` injects a ready engine (tests pass a fake); otherwise one is
    built on first use, in this process, from `model_path_or_name` (a folder, a hub id or `toy`).

    `eos_token_ids` are the ids that end a response (the trainer passes the model's generation config's, as the
    HF engine uses); a response is cut after the first of them. With `enable_sleep_mode`, the engine sleeps
    (level 1: weights to CPU memory, KV cache freed) between rollouts so training gets the GPU memory back.
    `config` (the model's) adds its image/video token ids to the banned vision tokens.
    `engine_kwargs` go to `vllm.LLM` as they are (e.g. `enforce_eager=True`, `mm_processor_kwargs={...}`).
    """

    def __init__(self, model_path_or_name: str, processor: Any, *, llm: Any = None,
                 gpu_memory_utilization: float = 0.5, seed: int = 0, dtype: str = "auto",
                 max_model_len: int | None = None, enable_sleep_mode: bool = False, trust_remote_code: bool = False,
                 eos_token_ids: Iterable[int] | None = None, config: Any = None, **engine_kwargs: Any):
        if not 0 < gpu_memory_utilization <= 1:
            raise VopdError("the vLLM GPU memory utilization must be in (0, 1]")
        if max_model_len is not None and max_model_len < 1:
            raise VopdError("the vLLM max model length must be positive")
        if engine_kwargs.get("tensor_parallel_size", 1) != 1:
            raise VopdError("--rollout-engine vllm runs on one GPU (tensor parallel size 1): the weight sync hands "
                            "tensors to one in-process worker; use a smaller model or --rollout-engine hf")
        self.processor = processor
        tok = processor.tokenizer
        if eos_token_ids is None:
            eos_token_ids = [tok.eos_token_id]
        self.eos_ids = sorted({int(i) for i in eos_token_ids if i is not None})
        self.vision_ids = set(vision_token_ids(processor, config))
        # bad_words are strings that vLLM tokenises; each vision token's own text is that single special token
        self.bad_words = [tok.convert_ids_to_tokens(i) for i in sorted(self.vision_ids)]
        self.sleep_mode = enable_sleep_mode
        self.engine_args: dict[str, Any] = {
            "model": resolve_model_path(model_path_or_name),
            "dtype": dtype,
            "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization,
            "trust_remote_code": trust_remote_code,
            "limit_mm_per_prompt": {"image": 1},
            # the log-probs of the distribution actually sampled from (after the temperature), as the trainer's
            "logprobs_mode": "processed_logprobs",
            "enable_sleep_mode": enable_sleep_mode,
            "enable_prefix_caching": True,  # a prompt's n samples prefill once (cache reset on every weight load)
            # the same decoding policy as the HF engine: the model's generation_config sampling defaults do not apply
            "generation_config": "vllm",
            **engine_kwargs,
        }
        if max_model_len is not None:
            self.engine_args["max_model_len"] = max_model_len
        self._llm = llm
        self._asleep: set[str] = set()

    @classmethod
    def for_trainer(cls, cfg: Any, model: Any, processor: Any, **kwargs: Any) -> VLLMRolloutEngine:
        """The engine `vopd distill --rollout-engine vllm` uses: the starting model, the trainer's EOS ids."""
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        gen_eos = getattr(getattr(hf, "generation_config", None), "eos_token_id", None)
        eos = gen_eos if gen_eos is not None else processor.tokenizer.eos_token_id
        check_temperature(cfg.temperature, "--temperature")
        engine = cls(cfg.model, processor, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed,
                     max_model_len=cfg.vllm_max_model_len, enable_sleep_mode=cfg.vllm_sleep_mode,
                     trust_remote_code=cfg.trust_remote_code,
                     eos_token_ids=eos if isinstance(eos, (list, tuple)) else [eos],
                     config=getattr(hf, "config", None), **kwargs)
        _ = engine.llm  # start it now: a vLLM that cannot start fails the run before any data is rendered
        return engine

    @property
    def llm(self) -> Any:
        if self._llm is None:
            self._llm = start_engine(self.engine_args)
        return self._llm

    # ------------------------------------------------------------------ rollouts

    def generate(self, prompts: Sequence[EncodedPrompt], settings: SamplingSettings) -> list[Rollout]:
        if not prompts:
            return []
        llm = self.llm  # started on first use
        self._wake(*SLEEP_TAGS)
        requests = [vllm_request(p) for p in prompts]
        # One seed per call from torch's generator (seeded per step by the trainer, so a resumed run draws the same);
        # prompt i gets base + i·n and vLLM gives its j-th sample base + i·n + j: every sample has its own stream.
        base = int(torch.randint(0, 2**31 - 1 - len(prompts) * settings.n, ()).item())
        seeds = settings.prompt_seeds or [base + i * settings.n for i in range(len(prompts))]
        params = [self.sampling_params(settings, seed) for seed in seeds]
        try:
            outputs = llm.generate(requests, sampling_params=params, use_tqdm=False)
        except vllm_validation_errors() as e:  # vLLM's input checks, e.g. a prompt longer than max_model_len
            raise VopdError(f"vLLM rejected a rollout request: {one_line(e)}") from None
        if len(outputs) != len(prompts):
            raise VopdError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        rollouts = []
        for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
            self._check_prompt(i, prompt, out)
            if len(out.outputs) != settings.n:
                raise VopdError(f"vLLM returned {len(out.outputs)} samples for prompt {i}, asked for {settings.n}")
            for completion in out.outputs:
                rollouts.append(self._rollout(i, completion))
        if self.sleep_mode:
            llm.sleep(level=SLEEP_LEVEL)
            self._asleep = set(SLEEP_TAGS)
        return rollouts

    def sampling_params(self, settings: SamplingSettings, seed: int) -> Any:
        """Plain sampling at the trainer's temperature (vLLM's top-k and top-p default to off)."""
        from vllm import SamplingParams

        return SamplingParams(n=settings.n, temperature=settings.temperature, max_tokens=settings.max_new_tokens,
                              top_p=1.0, top_k=0, repetition_penalty=1.0, seed=seed, logprobs=0,
                              bad_words=self.bad_words or None, stop_token_ids=self.eos_ids, detokenize=False)

    def _check_prompt(self, i: int, prompt: EncodedPrompt, out: Any) -> None:
        """The trainer scores the rollout after its own encoding of the prompt: vLLM must have seen the same ids,
        or the rollout was drawn in another context (typically another image resolution)."""
        got = getattr(out, "prompt_token_ids", None)
        if got is None:
            return
        want = prompt.input_ids.tolist()
        if list(got) != want:
            raise VopdError(f"vLLM encoded prompt {i} as {len(got)} tokens, the trainer as {len(want)}: vLLM's "
                            "processor settings differ from the model's (pass mm_processor_kwargs to match)")

    def _rollout(self, prompt_index: int, completion: Any) -> Rollout:
        ids = [int(t) for t in completion.token_ids]
        end = next((j + 1 for j, t in enumerate(ids) if t in self.eos_ids), len(ids))
        ids = ids[:end]  # up to and including the first EOS, as the HF engine cuts
        drawn = set(ids) & self.vision_ids
        if drawn:
            raise VopdError(f"vLLM sampled vision token(s) {sorted(drawn)} although they are banned (bad_words)")
        logprobs = None
        if completion.logprobs is not None:
            logprobs = [float(_logprob(step[t])) for t, step in zip(ids, completion.logprobs[:end], strict=True)]
        return Rollout(prompt_index, ids, logprobs)

    # ------------------------------------------------------------------ weights

    def sync_weights(self, model: Any) -> None:
        """Copy the trained weights into vLLM (called after every optimizer update)."""
        self._wake("weights")
        load_into_engine(self.llm, export_weights(model))

    def _wake(self, *tags: str) -> None:
        asleep = [t for t in tags if t in self._asleep]
        if asleep and self._llm is not None:
            free_cached_gpu_memory()  # what the trainer freed but torch still caches is what vLLM wakes into
            awake = self._llm.wake_up(tags=asleep)
            self._asleep -= set(asleep)
            if not self._asleep and awake is False:  # vLLM answers whether the engine is fully awake
                raise VopdError(f"vLLM did not wake up fully after waking {', '.join(asleep)}")

    def close(self) -> None:
        """Drop the engine (its GPU memory goes back when it is collected)."""
        self._llm = None
        gc.collect()


def vllm_request(prompt: EncodedPrompt) -> dict[str, Any]:
    """One prompt as vLLM takes it, for every family alike: the trainer's chat text (with the family's own image
    placeholder, which vLLM's processor expands as the HF processor did) and the PIL image, one per prompt."""
    return {"prompt": prompt.text, "multi_modal_data": {"image": prompt.image}}


def _logprob(entry: Any) -> float:
    """vLLM gives a `Logprob(logprob, rank, decoded_token)` per token id."""
    return entry.logprob if hasattr(entry, "logprob") else float(entry)


def start_engine(engine_args: dict[str, Any]) -> Any:
    """`vllm.LLM(**engine_args)` with its engine core in this process (see MULTIPROCESSING_ENV), after checking that
    the GPU has the memory share asked for, and with the trainer's random states as they were before."""
    set_in_process_mode(os.environ)
    try:
        from vllm import LLM
    except ImportError:
        raise VopdError("--rollout-engine vllm needs vLLM: pip install 'vopd[vllm]' (Linux with a CUDA GPU)") from None
    check_free_gpu_memory(engine_args["gpu_memory_utilization"], *_gpu_memory())
    try:
        with preserved_rng_state():  # building the in-process worker reseeds random, numpy and torch
            return LLM(**engine_args)
    except Exception as e:  # noqa: BLE001 - any start-up failure is a run-level error with one readable line
        raise VopdError(f"vLLM could not load {engine_args['model']!r}: {type(e).__name__}: {one_line(e)}") from None


def set_in_process_mode(environ: Any) -> None:
    """Set `VLLM_ENABLE_V1_MULTIPROCESSING=0`, refusing a user setting that asks for the other mode."""
    value = environ.get(MULTIPROCESSING_ENV)
    if value is not None and value.strip() not in ("0", ""):
        raise VopdError(f"{MULTIPROCESSING_ENV}={value} is set, but --rollout-engine vllm needs vLLM's engine in "
                        f"this process for the weight sync: unset it or set it to 0")
    environ[MULTIPROCESSING_ENV] = "0"


def check_free_gpu_memory(share: float, free: int | None, total: int | None) -> None:
    """vLLM claims `share` of the GPU's *total* memory; what the trainer already holds is not available to it."""
    if free is None or total is None or total <= 0:
        return
    if free < share * total:
        gib = 2**30
        raise VopdError(f"--vllm-gpu-memory-utilization {share} asks for {share * total / gib:.1f} GiB of the GPU's "
                        f"{total / gib:.1f} GiB but only {free / gib:.1f} GiB is free: lower it to at most "
                        f"{int(free / total * 100) / 100:.2f} or free memory (smaller model, --lora, fewer rollouts)")


def _gpu_memory() -> tuple[int | None, int | None]:
    if not torch.cuda.is_available():
        return None, None
    free_cached_gpu_memory()  # memory torch caches but no tensor holds is free for vLLM: count it as free
    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


def free_cached_gpu_memory() -> None:
    """Give the blocks torch's allocator caches back to the driver, so another allocator (vLLM's) can have them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def preserved_rng_state() -> Iterator[None]:
    """The states of Python's, numpy's and torch's (CPU and CUDA) generators restored on exit."""
    import numpy as np

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------- weight export


def export_weights(model: Any) -> dict[str, Tensor]:
    """The trained weights under the names `save_pretrained` writes (the names vLLM loads checkpoints by).

    Full fine-tuning: the whole state dict, tied copies dropped. LoRA (a PEFT model): each adapted layer as one
    merged weight W + Σ ΔW over its active adapters (the base itself is left untouched), plus any other trainable
    parameter; the frozen rest is what vLLM loaded at start. Tensors are views of the live parameters where
    possible: nothing is copied but the merged layers.
    """
    if hasattr(model, "get_base_model"):
        hf = model.get_base_model()
        weights = _merged_lora_weights(hf)
    else:
        hf = model
        weights = _drop_tied(model.state_dict(), model)
    # under FSDP each rank holds shards: gather every tensor whole (one collective each, the same order on all ranks)
    from torch.distributed.tensor import DTensor

    weights = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in weights.items()}
    return _checkpoint_names(hf, weights)


def _merged_lora_weights(hf: Any) -> dict[str, Tensor]:
    from peft.tuners.lora import LoraLayer

    out: dict[str, Tensor] = {}
    adapted = set()
    for name, module in hf.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        adapted.add(name)
        base = module.get_base_layer()
        with torch.no_grad():
            weight = base.weight.detach()
            if not getattr(module, "merged", False) and not getattr(module, "disable_adapters", False):
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                if isinstance(delta, Tensor):
                    weight = weight + delta.to(weight.dtype)
        out[f"{name}.weight"] = weight
    for name, p in hf.named_parameters():
        if p.requires_grad and ".lora_" not in name:  # e.g. modules_to_save: trained outright
            clean = name.replace(".base_layer", "")
            if ".modules_to_save." in clean:
                head, _, rest = clean.partition(".modules_to_save.")
                clean = f"{head}.{rest.split('.', 1)[1]}"
            out[clean] = p.detach()
    return out


def _drop_tied(state: dict[str, Tensor], model: Any) -> dict[str, Tensor]:
    if not hasattr(model, "config"):  # not a transformers model: nothing tied by its rules
        return state
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # older transformers: vLLM skips a tied lm_head it is sent anyway
        return state
    return remove_tied_weights_from_state_dict(state, model)


def _checkpoint_names(hf: Any, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Module names → checkpoint names, by the conversion transformers itself reverts at save time (e.g. Qwen2-VL's
    `model.language_model.*` is saved as `model.*`, `model.visual.*` as `visual.*`)."""
    if not hasattr(hf, "config"):
        return weights
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5 keeps checkpoint names in the module tree
        return weights
    return revert_weight_conversion(hf, weights)


def load_weights_on_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> int:
    """Runs on vLLM's worker through `LLM.collective_rpc` (which passes the worker first): the model's own
    `load_weights` maps checkpoint names onto its fused layers. A module-level function, so that it is never a
    pickled closure; returns only a count, as vLLM sends each worker's result back."""
    worker.get_model().load_weights(iter(weights))
    return len(weights)


def load_into_engine(llm: Any, weights: dict[str, Tensor]) -> None:
    """Hand `weights` (checkpoint names) to vLLM's worker, then drop the caches the old weights filled: the prefix
    cache (keys and values) and the encoder cache (image features; it lives on `LLM.llm_engine`). The multimodal
    processor cache holds preprocessed pixels, which no weight changes, so it stays."""
    llm.collective_rpc(load_weights_on_worker, args=(list(weights.items()),))
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()


__all__ = ["VLLMRolloutEngine", "check_free_gpu_memory", "export_weights", "load_into_engine", "load_weights_on_worker",
           "preserved_rng_state", "set_in_process_mode", "start_engine", "vllm_request"]
