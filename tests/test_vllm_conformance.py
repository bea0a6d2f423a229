"""Every vLLM name, signature, exception class and behaviour vopd relies on, checked against the real package, and
tests/fake_vllm.py checked against it too (so the fakes the other tests use cannot drift from vLLM).

Runs wherever `vllm` is importable (no GPU needed: nothing here starts an engine) and skips with the reason
otherwise; benchmarks/vllm_conformance.sh sets up a separate environment with vLLM and runs it there. vopd's own
imports stay light (no model loading), so vopd runs from source beside vLLM's torch and transformers.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from types import SimpleNamespace

import fake_vllm
import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here; benchmarks/vllm_conformance.sh runs this "
                                          "test in an environment that has it")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402


def params(func) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(func).parameters)


def assert_fake_matches(fake, real) -> None:
    """Each parameter the fake declares exists in the real signature with the same kind and default (the real
    `**kwargs` absorbs named ones, as LLM(...) forwards them to EngineArgs)."""
    fp, rp = params(fake), params(real)
    for name, p in fp.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            assert any(q.kind is inspect.Parameter.VAR_KEYWORD for q in rp.values()), f"{real}: no **kwargs"
            continue
        assert name in rp, f"{real.__qualname__} has no parameter {name!r}"
        assert p.kind == rp[name].kind, f"{real.__qualname__}({name}): {p.kind} vs {rp[name].kind}"
        assert p.default == rp[name].default, f"{real.__qualname__}({name}): default {p.default!r} vs {rp[name].default!r}"


@pytest.mark.parametrize("method", ["__init__", "generate", "chat", "collective_rpc", "apply_model",
                                    "reset_prefix_cache", "reset_mm_cache", "sleep", "wake_up"])
def test_fake_llm_methods_match_the_real_ones(method):
    assert_fake_matches(getattr(fake_vllm.LLM, method), getattr(LLM, method))


def test_return_types_vopd_relies_on():
    hints = {m: typing.get_type_hints(getattr(LLM, m)).get("return") for m in ("wake_up", "reset_prefix_cache")}
    assert hints == {"wake_up": bool, "reset_prefix_cache": bool}  # wake_up: whether the engine is fully awake
    assert "list" in str(typing.get_type_hints(LLM.collective_rpc)["return"])
    for m in ("wake_up", "reset_prefix_cache"):
        assert typing.get_type_hints(getattr(fake_vllm.LLM, m))["return"] is bool


def test_the_engine_and_the_worker_pieces_live_where_the_fake_puts_them():
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.worker.worker_base import WorkerBase, WorkerWrapperBase

    assert "self.llm_engine = LLMEngine" in inspect.getsource(LLM.__init__)
    assert_fake_matches(fake_vllm.LLMEngine.reset_encoder_cache, LLMEngine.reset_encoder_cache)
    assert not hasattr(LLM, "reset_encoder_cache")  # it lives on llm_engine only
    assert_fake_matches(fake_vllm.Worker.get_model, WorkerBase.get_model)
    assert "__getattr__" in vars(WorkerWrapperBase)  # the wrapper collective_rpc passes forwards get_model


def test_in_process_rpc_calls_a_module_level_function_on_the_worker_unserialised():
    from vllm.v1.serial_utils import run_method

    from vopd_train.rollout_vllm import reload_weights_on_worker

    loaded = []
    tensor = object()  # not picklable-by-value anything: it must arrive as the very object
    worker = SimpleNamespace(reload_weights=lambda weights_iterator, is_checkpoint_format: loaded.extend(
        weights_iterator))
    assert run_method(worker, reload_weights_on_worker, ([("w", tensor)],), {}) == 1
    assert loaded == [("w", tensor)] and loaded[0][1] is tensor


def test_the_workers_in_place_reload_is_what_the_sync_calls():
    """The GPU and CPU workers both forward `reload_weights` to the model runner, whose signature the fake
    worker has; the reload loads checkpoint-format weights layer by layer and keeps the layers it is not sent."""
    from vllm.model_executor.model_loader.reload import inplace
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    assert "self.model_runner.reload_weights(*args, **kwargs)" in inspect.getsource(Worker.reload_weights)
    assert_fake_matches(fake_vllm.Worker.reload_weights, GPUModelRunner.reload_weights)
    assert "initialize_layerwise_reload" in inspect.getsource(inplace.reload_weights)
    try:
        from vllm.v1.worker.cpu_worker import CPUWorker
    except ImportError:  # a CUDA build may leave the CPU worker out
        return
    assert issubclass(CPUWorker, Worker) and "reload_weights" not in vars(CPUWorker)


def test_the_tied_head_refresh_calls_what_unquantized_layers_have():
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    assert "layer" in params(UnquantizedEmbeddingMethod.process_weights_after_loading)


def test_platform_and_engine_memory_arguments():
    from vllm.config.parallel import DistributedExecutorBackend
    from vllm.platforms import current_platform

    assert isinstance(current_platform.device_type, str)
    assert isinstance(current_platform.is_sleep_mode_available(), bool)
    assert "external_launcher" in typing.get_args(DistributedExecutorBackend)
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert {"kv_cache_memory_bytes", "distributed_executor_backend", "enable_prefix_caching"} <= fields
    assert_fake_matches(fake_vllm.Platform.is_sleep_mode_available, type(current_platform).is_sleep_mode_available)


def test_multiprocessing_switch_reads_the_variable_vopd_sets(monkeypatch):
    import vllm.envs as envs

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    assert envs.environment_variables["VLLM_ENABLE_V1_MULTIPROCESSING"]() is False
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    assert envs.environment_variables["VLLM_ENABLE_V1_MULTIPROCESSING"]() is True  # vLLM's default: vopd must set it


def test_engine_arguments_vopd_passes_are_vllms():
    from vllm.config.model import LogprobsMode

    fields = {f.name: f for f in dataclasses.fields(EngineArgs)}
    for name in ("model", "tensor_parallel_size", "dtype", "seed", "gpu_memory_utilization", "trust_remote_code",
                 "limit_mm_per_prompt", "enforce_eager", "max_model_len", "mm_processor_kwargs", "logprobs_mode",
                 "enable_sleep_mode", "generation_config"):
        assert name in fields, name
    assert "processed_logprobs" in typing.get_args(LogprobsMode)
    assert fields["generation_config"].default == "auto"  # the model's defaults unless vopd says "vllm"


def test_sampling_params_vopd_builds_are_accepted_and_match_the_fake():
    from vopd_bench.backends.base import GenerationConfig
    from vopd_bench.backends.vllm import sampling_params
    from vopd_train.rollout import SamplingSettings
    from vopd_train.rollout_vllm import VLLMRolloutEngine

    real = sampling_params(GenerationConfig(max_new_tokens=7, temperature=0.7, seed=3))
    assert isinstance(real, SamplingParams)
    assert (real.temperature, real.top_p, real.top_k, real.repetition_penalty, real.max_tokens, real.seed) == (
        0.7, 1.0, 0, 1.0, 7, 3)
    rollout = VLLMRolloutEngine.sampling_params(SimpleNamespace(bad_words=["<|image_pad|>"], eos_ids=[2]),
                                                SamplingSettings(n=2, temperature=1.0, max_new_tokens=5), 9)
    assert (rollout.n, rollout.logprobs, rollout.stop_token_ids, rollout.bad_words, rollout.detokenize) == (
        2, 0, [2], ["<|image_pad|>"], False)
    real_default, fake_default = SamplingParams(), fake_vllm.SamplingParams()  # defaults after each one's checks
    for f in dataclasses.fields(fake_vllm.SamplingParams):
        assert f.name in params(SamplingParams), f.name
        assert getattr(real_default, f.name) == getattr(fake_default, f.name), f.name


def test_validation_errors_and_temperature_limits():
    from vllm.exceptions import VLLMClientError, VLLMError, VLLMValidationError

    from vopd_bench.backends.vllm import MAX_TEMPERATURE, MIN_SAMPLING_TEMPERATURE, vllm_validation_errors

    assert VLLMValidationError in vllm_validation_errors()
    assert VLLMValidationError.__mro__[1:4] == (VLLMClientError, VLLMError, Exception)
    assert [c.__name__ for c in fake_vllm.VLLMValidationError.__mro__[:4]] == [
        c.__name__ for c in VLLMValidationError.__mro__[:4]]
    assert_fake_matches(fake_vllm.VLLMValidationError.__init__, VLLMValidationError.__init__)
    SamplingParams(temperature=MAX_TEMPERATURE)
    with pytest.raises(VLLMValidationError):
        SamplingParams(temperature=MAX_TEMPERATURE + 0.01)
    assert SamplingParams(temperature=MIN_SAMPLING_TEMPERATURE / 2).temperature == MIN_SAMPLING_TEMPERATURE
    with pytest.raises(fake_vllm.VLLMValidationError):
        fake_vllm.SamplingParams(temperature=MAX_TEMPERATURE + 0.01)


def test_sleep_levels_and_wake_tags():
    doc = inspect.getdoc(LLM.sleep)
    assert "Level 1: Offload model weights to CPU" in doc and "Level 2: Discard all GPU memory" in doc
    assert '("weights", "kv_cache"' in inspect.getdoc(LLM.wake_up)


def test_output_classes_carry_what_vopd_reads():
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput

    for fake, real in ((fake_vllm.CompletionOutput, CompletionOutput), (fake_vllm.Logprob, Logprob)):
        real_names = {f.name for f in dataclasses.fields(real)}
        assert {f.name for f in dataclasses.fields(fake)} <= real_names, real
    assert {"prompt_token_ids", "outputs", "request_id", "prompt"} <= set(params(RequestOutput.__init__))
