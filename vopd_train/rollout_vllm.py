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

Written against the vLLM ≥ 0.18 offline API (`LLM(..., logprobs_mode=..., enable_sleep_mode=...)`,
`LLM.generate(prompts, sampling_params=list, use_tqdm=False)`, `SamplingParams(n, temperature, max_tokens, seed,
logprobs, bad_words, stop_token_ids, detokenize)`, `llm.llm_engine.model_executor.driver_worker` when the engine
core runs in-process, `LLM.apply_model` otherwise). The tests drive it through a fake engine honouring those calls;
it has not been run against a real vLLM in this repository's CI, which has no GPU.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from vopd_bench.errors import VopdError
from vopd_bench.modeling import one_line, resolve_model_path, vision_token_ids
from vopd_train.rollout import EncodedPrompt, Rollout, SamplingSettings

# vLLM tags the memory that `sleep` offloads or drops.
SLEEP_TAGS = ("weights", "kv_cache")


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
        params = [self.sampling_params(settings, base + i * settings.n) for i in range(len(prompts))]
        try:
            outputs = llm.generate(requests, sampling_params=params, use_tqdm=False)
        except ValueError as e:  # vLLM's input checks, e.g. a prompt longer than max_model_len
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
            llm.sleep(level=1)
            self._asleep = set(SLEEP_TAGS)
        return rollouts

    def sampling_params(self, settings: SamplingSettings, seed: int) -> Any:
        """Plain sampling at the trainer's temperature (vLLM's top-k and top-p default to off)."""
        from vllm import SamplingParams

        return SamplingParams(n=settings.n, temperature=settings.temperature, max_tokens=settings.max_new_tokens,
                              seed=seed, logprobs=0, bad_words=self.bad_words or None, stop_token_ids=self.eos_ids,
                              detokenize=False)

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
            self._llm.wake_up(tags=asleep)
            self._asleep -= set(asleep)

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
    """`vllm.LLM(**engine_args)` with its engine core in this process, so that `sync_weights` can reach the model
    (a separate engine process would need the weights serialised across; vLLM refuses that by default)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        from vllm import LLM
    except ImportError:
        raise VopdError("--rollout-engine vllm needs vLLM: pip install 'vopd[vllm]' (Linux with a CUDA GPU)") from None
    try:
        return LLM(**engine_args)
    except Exception as e:  # noqa: BLE001 - any start-up failure is a run-level error with one readable line
        raise VopdError(f"vLLM could not load {engine_args['model']!r}: {type(e).__name__}: {one_line(e)}") from None


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


def driver_model(llm: Any) -> Any:
    """vLLM's model object when its engine core runs in this process, else None."""
    executor = getattr(getattr(llm, "llm_engine", None), "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    worker = getattr(worker, "worker", worker)  # a WorkerWrapperBase wraps the worker in newer versions
    return getattr(getattr(worker, "model_runner", None), "model", None)


def load_into_engine(llm: Any, weights: dict[str, Tensor]) -> None:
    """Hand `weights` (checkpoint names) to vLLM's `load_weights`, then drop the caches the old weights filled."""
    model = driver_model(llm)
    if model is not None and callable(getattr(model, "load_weights", None)):
        model.load_weights(iter(weights.items()))
    elif callable(getattr(llm, "apply_model", None)):
        items = list(weights.items())

        def load(m: Any) -> None:  # returns nothing: vLLM sends each worker's result back
            m.load_weights(iter(items))

        llm.apply_model(load)
    else:
        raise VopdError("cannot push weights into this vLLM engine: it exposes neither an in-process model "
                        "(llm.llm_engine.model_executor.driver_worker) nor LLM.apply_model")
    for owner in (llm, getattr(llm, "llm_engine", None)):
        if owner is not None and callable(getattr(owner, "reset_prefix_cache", None)):
            owner.reset_prefix_cache()
            break
    for owner in (llm, getattr(llm, "llm_engine", None)):
        if owner is not None and callable(getattr(owner, "reset_encoder_cache", None)):
            owner.reset_encoder_cache()
            break
    else:
        warnings.warn("this vLLM has no reset_encoder_cache: image features cached before the weight sync may be "
                      "reused", stacklevel=2)


__all__ = ["VLLMRolloutEngine", "driver_model", "vllm_request", "export_weights", "load_into_engine", "start_engine"]
