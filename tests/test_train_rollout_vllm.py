"""`VLLMRolloutEngine` through tests/fake_vllm.py, which follows vLLM 0.33.0's API (`LLM(...)`, `LLM.generate`,
`SamplingParams`, `collective_rpc` with the worker's `reload_weights`, cache resets, sleep/wake, the platform);
test_vllm_conformance.py checks the fake against the real package, and tests/real_vllm/ runs the same paths on a
real engine (vLLM's CPU release).

What these tests pin down is what the engine asks of vLLM and what it does with the answers; the end-to-end
tests use a fake whose rollouts come from its own copy of the tiny model (sampled with transformers), kept up to
date only through `sync_weights`, so a missing or wrong sync shows up in its outputs.
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import types
from types import SimpleNamespace

import fake_vllm
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from vopd_bench.errors import VopdError
from vopd_bench.modeling import load_model, vision_token_ids
from vopd_train.config import DistillConfig
from vopd_train.rollout import SamplingSettings, encode_prompts
from vopd_train.rollout_vllm import VLLMRolloutEngine, export_weights
from vopd_train.trainer import Distiller

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- engines on the fake vllm module


class ScriptedLLM(fake_vllm.LLM):
    """Answers every prompt with the scripted token rows (one per sample, cycled; ids ≥ 40, as 0-6 are the
    tiny tokenizer's special tokens) and log-prob -0.5·(k+1) at position k; reports the prompt ids it is given in
    `prompt_ids`; records every call and event."""

    def __init__(self, model: str = "m", rows=None, prompt_ids=None, weights_model=None, **kwargs):
        super().__init__(model, **kwargs)
        self.rows = rows or [[40, 41]]
        self.prompt_ids = prompt_ids
        self.worker = fake_vllm.Worker(weights_model)
        self._next = 0

    def answer(self, prompt, params):
        comps = [fake_vllm.completion(row, [-0.5 * (k + 1) for k in range(len(row))], index=j)
                 for j in range(params.n) for row in [self.rows[j % len(self.rows)]]]
        ids = self.prompt_ids[self._next] if self.prompt_ids else None
        self._next += 1
        return fake_vllm.RequestOutput(str(self._next), prompt["prompt"], ids, None, comps)


class RecordingModel(torch.nn.Module):
    """vLLM's model side of `load_weights`: records what it is sent."""

    def __init__(self):
        super().__init__()
        self.loads: list[dict[str, torch.Tensor]] = []

    def load_weights(self, weights):
        got = dict(weights)
        self.loads.append(got)
        return set(got)


@pytest.fixture
def fake_vllm_module(monkeypatch):
    """A `vllm` module on a CPU platform whose LLM(...) records its arguments and builds what `factory` returns."""
    made = []
    state = {"factory": lambda **kw: ScriptedLLM(**kw)}

    def make_llm(**kwargs):
        llm = state["factory"](**kwargs)
        made.append((kwargs, llm))
        return llm

    module = fake_vllm.install(monkeypatch, make_llm)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return SimpleNamespace(made=made, state=state, module=module)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prompts(tiny):
    _, processor = tiny
    images = [Image.new("RGB", (224, 224), (200, 30, 30)), Image.new("RGB", (120, 60), (30, 200, 30))]
    return encode_prompts(processor, images, ["What colour is it?", "What shape is the red object? (A) circle"])


def eos_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


# ---------------------------------------------------------------------- requests and answers


def test_requests_carry_the_chat_text_and_image_and_the_sampling_settings(fake_vllm_module, tiny, prompts, tiny_model_dir):
    _, processor = tiny
    llm = ScriptedLLM(rows=[[70, 71, 72]])
    engine = VLLMRolloutEngine(str(tiny_model_dir), processor, llm=llm, eos_token_ids=[eos_id(processor)])
    torch.manual_seed(3)
    rolls = engine.generate(prompts, SamplingSettings(n=3, temperature=0.7, max_new_tokens=5))
    [call] = llm.calls  # one batched call
    assert call["use_tqdm"] is False
    for req, p in zip(call["prompts"], prompts, strict=True):
        assert req["prompt"] == p.text and req["multi_modal_data"]["image"] is p.image
        # the text is the model's chat template around one image placeholder, as the HF processor got it
        assert req["prompt"].count("<|image_pad|>") == 1 and req["prompt"].endswith("<|im_start|>assistant\n")
    sp0, sp1 = call["sampling_params"]
    assert (sp0.n, sp0.temperature, sp0.max_tokens, sp0.logprobs, sp0.detokenize) == (3, 0.7, 5, 0, False)
    assert sp0.stop_token_ids == [eos_id(processor)]
    # per-prompt seeds: vLLM seeds sample j of a prompt with seed + j, so prompts sit n apart and never overlap
    assert sp1.seed == sp0.seed + 3
    torch.manual_seed(3)  # the seed comes from torch's generator, which the trainer reseeds every step
    engine.generate(prompts, SamplingSettings(n=3, temperature=0.7, max_new_tokens=5))
    assert llm.calls[1]["sampling_params"][0].seed == sp0.seed
    # prompt-major rollouts with the scripted tokens and their log-probs
    assert [r.prompt_index for r in rolls] == [0, 0, 0, 1, 1, 1]
    assert all(r.token_ids == [70, 71, 72] and r.logprobs == [-0.5, -1.0, -1.5] for r in rolls)


def test_vision_tokens_are_banned_by_their_text(fake_vllm_module, tiny, prompts, tiny_model_dir):
    """vLLM tokenises each bad word (without special-token wrapping): each must come out as one vision id."""
    _, processor = tiny
    llm = ScriptedLLM()
    engine = VLLMRolloutEngine(str(tiny_model_dir), processor, llm=llm)
    engine.generate(prompts[:1], SamplingSettings(n=1, max_new_tokens=4))
    words = llm.calls[0]["sampling_params"][0].bad_words
    banned = [processor.tokenizer.encode(w, add_special_tokens=False) for w in words]
    assert sorted(banned) == [[i] for i in sorted(vision_token_ids(processor))] and len(banned) >= 3
    # a vLLM that samples one anyway is an error, never a silently shortened rollout
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    bad = VLLMRolloutEngine(str(tiny_model_dir), processor, llm=ScriptedLLM(rows=[[40, image_pad, 41]]))
    with pytest.raises(VopdError, match=rf"vision token\(s\) \[{image_pad}\]"):
        bad.generate(prompts[:1], SamplingSettings(n=1, max_new_tokens=4))


def test_responses_end_at_the_first_eos(fake_vllm_module, tiny, prompts, tiny_model_dir):
    _, processor = tiny
    eos, other_eos = eos_id(processor), processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rows = [[40, eos, 41, 42], [40, 41, 42, 43], [other_eos, 44], [eos]]
    engine = VLLMRolloutEngine(str(tiny_model_dir), processor, llm=ScriptedLLM(rows=rows),
                               eos_token_ids=[eos, other_eos])
    rolls = engine.generate(prompts[:1], SamplingSettings(n=4, max_new_tokens=4))
    assert [r.token_ids for r in rolls] == [[40, eos], [40, 41, 42, 43], [other_eos], [eos]]
    assert [r.logprobs for r in rolls] == [[-0.5, -1.0], [-0.5, -1.0, -1.5, -2.0], [-0.5], [-0.5]]
    assert engine.llm.calls[0]["sampling_params"][0].stop_token_ids == sorted([eos, other_eos])


def test_prompt_ids_must_match_the_trainers(fake_vllm_module, tiny, prompts, tiny_model_dir):
    _, processor = tiny
    same = [p.input_ids.tolist() for p in prompts]
    VLLMRolloutEngine(str(tiny_model_dir), processor, llm=ScriptedLLM(prompt_ids=same)).generate(
        prompts, SamplingSettings(n=1, max_new_tokens=2))
    shorter = [same[0], same[1][:-3]]  # e.g. vLLM resized the second image to fewer patches
    engine = VLLMRolloutEngine(str(tiny_model_dir), processor, llm=ScriptedLLM(prompt_ids=shorter))
    with pytest.raises(VopdError, match=rf"prompt 1 as {len(same[1]) - 3} tokens, the trainer as {len(same[1])}"):
        engine.generate(prompts, SamplingSettings(n=1, max_new_tokens=2))


def test_engine_is_built_lazily_in_process_with_the_settings(fake_vllm_module, tiny, prompts, tiny_model_dir):
    _, processor = tiny
    fake_vllm_module.module.platforms.current_platform = fake_vllm.Platform("cuda", sleep=True)
    engine = VLLMRolloutEngine("toy", processor, gpu_memory_utilization=0.3, seed=5, dtype="bfloat16",
                               max_model_len=2048, enable_sleep_mode=True, enforce_eager=True)
    assert fake_vllm_module.made == []  # nothing started yet
    engine.generate(prompts[:1], SamplingSettings(n=1, max_new_tokens=2))
    [(kwargs, _)] = fake_vllm_module.made
    from vopd_bench.modeling import TOY_DIR

    assert kwargs == {"model": str(TOY_DIR), "dtype": "bfloat16", "seed": 5, "gpu_memory_utilization": 0.3,
                      "trust_remote_code": False, "limit_mm_per_prompt": {"image": 1},
                      "logprobs_mode": "processed_logprobs", "enable_sleep_mode": True, "enable_prefix_caching": True,
                      "enforce_eager": True, "max_model_len": 2048, "generation_config": "vllm"}
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # so that the model is reachable for the sync
    with pytest.raises(VopdError, match="utilization"):
        VLLMRolloutEngine("toy", processor, gpu_memory_utilization=0.0)
    with pytest.raises(VopdError, match="--vllm-dtype must be one of"):
        VLLMRolloutEngine("toy", processor, dtype="auto")


def test_on_a_cpu_the_kv_cache_is_a_share_of_what_the_host_can_spare(fake_vllm_module, tiny, prompts, monkeypatch):
    """vLLM on a CPU would reserve its share of the host's *total* memory for every engine (two engines at 0.5
    were the whole machine): each gets the share of the available memory, split over the ranks on the host."""
    import psutil

    from vopd_bench.distributed import Place
    from vopd_train.rollout_vllm import engine_memory

    _, processor = tiny
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=10 * 2**30, total=64 * 2**30))
    VLLMRolloutEngine("toy", processor, gpu_memory_utilization=0.4).generate(prompts[:1], SamplingSettings(n=1))
    [(kwargs, _)] = fake_vllm_module.made
    assert kwargs["kv_cache_memory_bytes"] == int(0.4 * 10 * 2**30) and "gpu_memory_utilization" not in kwargs
    two = Place(rank=1, world_size=2, local_rank=1)
    assert engine_memory(0.4, two, "cpu", available=10 * 2**30, environ={}) == {
        "kv_cache_memory_bytes": int(0.4 * 10 * 2**30 / 2)}
    # torchrun's LOCAL_WORLD_SIZE counts the ranks of this host only
    four = Place(rank=3, world_size=4, local_rank=1)
    assert engine_memory(0.4, four, "cpu", available=8 * 2**30, environ={"LOCAL_WORLD_SIZE": "2"}) == {
        "kv_cache_memory_bytes": int(0.4 * 8 * 2**30 / 2)}
    # GPUs: one rank per GPU keeps the whole share; ranks beyond the GPU count share one
    assert engine_memory(0.4, two, "cuda", gpus=2, environ={}) == {"gpu_memory_utilization": 0.4}
    assert engine_memory(0.4, four, "cuda", gpus=2, environ={"LOCAL_WORLD_SIZE": "4"}) == {
        "gpu_memory_utilization": 0.2}


def test_under_torchrun_each_rank_starts_its_own_engine_seeded_by_its_rank(fake_vllm_module, tiny, prompts):
    from vopd_bench.distributed import Place

    _, processor = tiny
    for rank in (0, 1):
        engine = VLLMRolloutEngine("toy", processor, seed=7, place=Place(rank=rank, world_size=2, local_rank=rank))
        engine.generate(prompts[:1], SamplingSettings(n=1, max_new_tokens=2))
    (first, _), (second, _) = fake_vllm_module.made
    assert first["distributed_executor_backend"] == second["distributed_executor_backend"] == "external_launcher"
    assert (first["seed"], second["seed"]) == (7, 8)
    VLLMRolloutEngine("toy", processor, seed=7).generate(prompts[:1], SamplingSettings(n=1, max_new_tokens=2))
    assert "distributed_executor_backend" not in fake_vllm_module.made[-1][0]  # one process: vLLM's own default


def test_sleep_mode_without_a_platform_for_it_is_refused_before_any_work(fake_vllm_module, tiny_model_dir, tmp_path,
                                                                        monkeypatch):
    import vopd_train.trainer as trainer

    def no_data(*a, **k):
        raise AssertionError("the data was loaded before the refusal")

    monkeypatch.setattr(trainer, "load_prompts", no_data)
    with pytest.raises(VopdError, match=r"^--vllm-sleep-mode: vLLM has no sleep mode on this platform \(cpu\)"):
        Distiller(vllm_cfg(tiny_model_dir, tmp_path / "sleepy", vllm_sleep_mode=True))
    assert fake_vllm_module.made == []


def test_multiprocessing_mode_is_set_and_a_conflicting_setting_refused(fake_vllm_module, monkeypatch, tiny, prompts):
    from vopd_train.rollout_vllm import set_in_process_mode

    _, processor = tiny
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    set_in_process_mode(env)
    assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the user's export, which vLLM defaults to
    with pytest.raises(VopdError, match=r"VLLM_ENABLE_V1_MULTIPROCESSING=1 is set, .* unset it or set it to 0"):
        VLLMRolloutEngine("toy", processor).generate(prompts[:1], SamplingSettings(n=1))
    assert fake_vllm_module.made == []  # refused before any engine was built
    with pytest.raises(VopdError, match="needs torchrun"):
        VLLMRolloutEngine("toy", processor, tensor_parallel_size=2)


def test_free_gpu_memory_preflight():
    from vopd_train.rollout_vllm import check_free_gpu_memory

    gib = 2**30
    check_free_gpu_memory(0.5, free=40 * gib, total=80 * gib)  # exactly the share: fine
    check_free_gpu_memory(0.5, free=None, total=None)  # no GPU to ask: vLLM's own check stands
    with pytest.raises(VopdError) as e:
        check_free_gpu_memory(0.5, free=30 * gib, total=80 * gib)  # the trainer holds 50 GiB
    assert str(e.value) == ("--vllm-gpu-memory-utilization 0.5 asks for 40.0 GiB of the GPU's 80.0 GiB but only "
                            "30.0 GiB is free: lower it to at most 0.37 or free memory (smaller model, --lora, "
                            "fewer rollouts)")


def test_engine_start_leaves_the_trainers_random_states_as_they_were(fake_vllm_module, tiny, prompts):
    """vLLM seeds random, numpy and torch with its own seed when it builds the in-process worker."""
    _, processor = tiny

    def reseeding(**kw):
        random.seed(kw["seed"])
        np.random.seed(kw["seed"])
        torch.manual_seed(kw["seed"])
        return ScriptedLLM(**kw)

    fake_vllm_module.state["factory"] = reseeding
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    want = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    _ = VLLMRolloutEngine("toy", processor, seed=0).llm
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == want


def test_validation_error_from_vllm_is_one_line(fake_vllm_module, tiny, prompts, tiny_model_dir):
    _, processor = tiny

    class Rejecting(ScriptedLLM):
        def answer(self, prompt, params):
            raise fake_vllm.VLLMValidationError("The decoder prompt (length 9000) is longer than the maximum model "
                                                "length of 4096.\nMake sure that `max_model_len` is larger.")

    engine = VLLMRolloutEngine(str(tiny_model_dir), processor, llm=Rejecting())
    with pytest.raises(VopdError, match=r"^vLLM rejected a rollout request: The decoder prompt \(length 9000\)"):
        engine.generate(prompts[:1], SamplingSettings(n=1))


def test_temperature_above_vllms_limit_is_refused_before_the_engine_starts(fake_vllm_module, tiny_model_dir, tmp_path):
    with pytest.raises(VopdError, match=r"--temperature 2.5 is outside what vLLM samples at"):
        Distiller(vllm_cfg(tiny_model_dir, tmp_path / "hot", temperature=2.5))
    assert fake_vllm_module.made == []


def test_sleep_is_level_1_because_lora_syncs_send_only_the_adapted_layers():
    from vopd_train.rollout_vllm import SLEEP_LEVEL

    assert SLEEP_LEVEL == 1  # level 2 discards the weights a LoRA sync does not resend


def test_a_partial_wake_up_is_an_error(fake_vllm_module, tiny, prompts, tiny_model_dir):
    _, processor = tiny

    class Drowsy(ScriptedLLM):
        def wake_up(self, tags=None):
            super().wake_up(tags)
            return False

    engine = VLLMRolloutEngine(str(tiny_model_dir), processor, llm=Drowsy(), enable_sleep_mode=True)
    engine.generate(prompts[:1], SamplingSettings(n=1, max_new_tokens=2))
    with pytest.raises(VopdError, match="did not wake up fully after waking weights, kv_cache"):
        engine.generate(prompts[:1], SamplingSettings(n=1, max_new_tokens=2))


def test_missing_vllm_and_start_failure_are_one_line_errors(monkeypatch, tiny, prompts):
    _, processor = tiny
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(VopdError, match=r"pip install 'vopd\[vllm\]'"):
        VLLMRolloutEngine("org/model", processor).generate(prompts[:1], SamplingSettings(n=1))
    module = types.ModuleType("vllm")

    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20 GiB\ntraceback lines")

    module.LLM, module.SamplingParams = broken, fake_vllm.SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    with pytest.raises(VopdError) as e:
        VLLMRolloutEngine("org/model", processor).generate(prompts[:1], SamplingSettings(n=1))
    assert str(e.value) == ("vLLM could not load 'org/model': RuntimeError: CUDA out of memory. Tried to allocate "
                            "20 GiB traceback lines")


def test_sleep_mode_wakes_what_each_call_needs(fake_vllm_module, tiny, prompts, tiny_model_dir):
    _, processor = tiny
    llm = ScriptedLLM(weights_model=RecordingModel())
    engine = VLLMRolloutEngine(str(tiny_model_dir), processor, llm=llm, enable_sleep_mode=True)
    settings = SamplingSettings(n=1, max_new_tokens=2)
    engine.generate(prompts[:1], settings)
    engine.sync_weights(torch.nn.Linear(2, 2))
    engine.generate(prompts[:1], settings)
    assert llm.events == [("sleep", 1),  # after the rollouts: weights to CPU, KV cache freed
                          ("wake_up", ["weights"]), ("collective_rpc", "reload_weights_on_worker"),
                          ("collective_rpc", "refresh_tied_layers"),
                          ("reset_prefix_cache",), ("reset_encoder_cache",), ("reset_mm_cache",),
                          ("wake_up", ["kv_cache"]),  # the weights are back already
                          ("sleep", 1)]


def test_cached_gpu_memory_is_freed_before_the_preflight_and_each_wake_up(fake_vllm_module, tiny, prompts,
                                                                          tiny_model_dir, monkeypatch):
    """torch keeps freed GPU blocks cached: before vLLM's memory is checked and before it wakes into it, they go
    back to the driver (on the GPU's own calls, recorded here in order)."""
    from vopd_train import rollout_vllm

    _, processor = tiny
    llm = ScriptedLLM(weights_model=RecordingModel())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: llm.events.append(("empty_cache",)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (llm.events.append(("mem_get_info",)), (1, 2))[1])
    assert rollout_vllm._gpu_memory() == (1, 2)
    engine = VLLMRolloutEngine(str(tiny_model_dir), processor, llm=llm, enable_sleep_mode=True)
    settings = SamplingSettings(n=1, max_new_tokens=2)
    engine.generate(prompts[:1], settings)
    engine.generate(prompts[:1], settings)
    assert llm.events == [("empty_cache",), ("mem_get_info",), ("sleep", 1),
                          ("empty_cache",), ("wake_up", ["weights", "kv_cache"]), ("sleep", 1)]


# ---------------------------------------------------------------------- weight sync


def test_sync_sends_the_checkpoint_as_save_pretrained_writes_it(fake_vllm_module, tiny, tiny_model_dir):
    model, processor = tiny
    recorder = RecordingModel()
    llm = ScriptedLLM(weights_model=recorder)
    VLLMRolloutEngine(str(tiny_model_dir), processor, llm=llm).sync_weights(model)
    [sent] = recorder.loads
    saved = load_file(tiny_model_dir / "model.safetensors")
    assert sent.keys() == saved.keys()  # checkpoint names (visual.*, model.layers.*), the tied lm_head dropped
    for k in saved:
        assert sent[k].shape == saved[k].shape and torch.equal(sent[k], saved[k]), k
    # views of the live parameters, not copies
    assert sent["model.embed_tokens.weight"].data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    # through collective_rpc with a module-level function (never a closure) calling the worker's in-place reload,
    # then the caches built on the old weights, on the engine's side too
    assert llm.events == [("collective_rpc", "reload_weights_on_worker"), ("collective_rpc", "refresh_tied_layers"),
                          ("reset_prefix_cache",), ("reset_encoder_cache",), ("reset_mm_cache",)]


def test_lora_sync_sends_each_adapted_layer_merged(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"]))
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero: give the adapter something to merge
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    sent = export_weights(peft_model)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    saved = load_file(tiny_model_dir / "model.safetensors")
    adapted = {k for k in saved if k.endswith(("q_proj.weight", "fc1.weight"))}
    assert len(adapted) == 4  # 2 text q_proj + 2 vision fc1, under checkpoint names
    # each adapted layer goes with its whole group (vLLM rebuilds q, k and v as one fused layer): the attention's
    # projections and biases, the vision MLP's two layers; nothing else
    want = {k for k in saved if ".self_attn." in k or (k.startswith("visual.blocks.") and ".mlp." in k)}
    assert set(sent) == want and len(want) == 2 * 7 + 2 * 4
    reference = export_weights(merged)  # the merged model's own checkpoint tensors
    for k in want:
        torch.testing.assert_close(sent[k], reference[k], rtol=0, atol=1e-6)
        assert torch.equal(sent[k], saved[k]) == (k not in adapted), k  # only the adapted ones changed
    # and by hand for one layer: W + (α/r)·B·A
    layer = peft_model.get_base_model().model.language_model.layers[0].self_attn.q_proj
    by_hand = layer.base_layer.weight + (8 / 4) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(sent["model.layers.0.self_attn.q_proj.weight"], by_hand, rtol=0, atol=1e-6)
    # the base itself is untouched
    assert not torch.equal(layer.base_layer.weight, by_hand)


def test_the_sync_function_survives_pickling_and_a_closure_would_not(fake_vllm_module):
    """What vLLM does with an RPC callable outside the in-process layout: pickle it (by reference for a
    module-level function). The fake does the same, so a closure in the sync path fails these tests."""
    import pickle

    from vopd_train.rollout_vllm import reload_weights_on_worker

    assert pickle.loads(pickle.dumps(reload_weights_on_worker)) is reload_weights_on_worker
    recorder = RecordingModel()
    llm = ScriptedLLM(weights_model=recorder)
    assert llm.collective_rpc(reload_weights_on_worker, args=([("w", torch.ones(2))],)) == [1]
    assert torch.equal(recorder.loads[0]["w"], torch.ones(2))
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        llm.collective_rpc(lambda worker: None)


# ---------------------------------------------------------------------- end to end through the trainer


class HFBackedLLM(fake_vllm.LLM):
    """A vLLM stand-in with its own copy of the model: it renders the request with the processor (as vLLM does
    from text + image), samples with transformers `generate` (per-sample seeds, bad words, stop ids), reports the
    log-prob of each sampled token at the temperature, and takes new weights only through `load_weights` by
    checkpoint name."""

    def __init__(self, model: str, logprob_shift: float = 0.0, **kwargs):
        super().__init__(model, **kwargs)
        self.model, self.processor = load_model(model, device="cpu", dtype="float32")
        self.logprob_shift = logprob_shift
        self.loaded: list[dict[str, tuple]] = []
        from transformers.core_model_loading import revert_weight_conversion

        # checkpoint name -> parameter name (one-to-one renames for this model)
        self.by_ckpt = {next(iter(revert_weight_conversion(self.model, {n: torch.zeros(1)}))): n
                        for n in self.model.state_dict()}
        self.params = dict(self.model.named_parameters())
        self.model.load_weights = self.load_weights  # vLLM's models load by checkpoint name
        self.worker = fake_vllm.Worker(self.model)

    def load_weights(self, weights):
        record = {}
        with torch.no_grad():
            for name, tensor in weights:
                target = self.params[self.by_ckpt[name]]
                assert target.shape == tensor.shape, name
                target.copy_(tensor)
                record[name] = tuple(tensor.shape)
        self.loaded.append(record)

    @property
    def resets(self) -> int:
        return sum(e[0] in ("reset_prefix_cache", "reset_encoder_cache") for e in self.events)

    def answer(self, req, sp):
        tok = self.processor.tokenizer
        enc = self.processor(text=[req["prompt"]], images=[req["multi_modal_data"]["image"]], return_tensors="pt")
        bad = [tok.encode(w, add_special_tokens=False) for w in sp.bad_words]
        n = enc["input_ids"].shape[1]
        comps = []
        for j in range(sp.n):
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(sp.seed + j)
                seq = self.model.generate(**enc, do_sample=True, temperature=sp.temperature, top_k=0, top_p=1.0,
                                          max_new_tokens=sp.max_tokens, bad_words_ids=bad,
                                          eos_token_id=sp.stop_token_ids, pad_token_id=tok.pad_token_id)
                ids = seq[0, n:].tolist()
                if sp.stop_token_ids[0] in ids:  # generate pads after the stop; vLLM does not
                    ids = ids[:ids.index(sp.stop_token_ids[0]) + 1]
                full = torch.cat([enc["input_ids"], torch.tensor([ids])], 1)
                logits = self.model(input_ids=full, attention_mask=torch.ones_like(full),
                                    pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                                    mm_token_type_ids=torch.cat([enc["mm_token_type_ids"],
                                                                 torch.zeros(1, len(ids), dtype=torch.long)], 1)
                                    ).logits[0, n - 1:n - 1 + len(ids)].float() / sp.temperature
                lp = torch.log_softmax(logits, -1)[torch.arange(len(ids)), ids].tolist()
            comps.append(fake_vllm.completion(ids, [v + self.logprob_shift for v in lp], index=j))
        return fake_vllm.RequestOutput("0", req["prompt"], enc["input_ids"][0].tolist(), None, comps)


def vllm_cfg(model_dir, out, **kw) -> DistillConfig:
    base = dict(model=str(model_dir), data="synthetic:train", out=str(out), data_limit=4, steps=2, batch_size=2,
                n_rollouts=2, max_new_tokens=3, micro_batch_size=4, lr=1e-2, warmup_steps=0, topk=20, seed=0,
                teacher="frozen", importance_weight=True, rollout_engine="vllm", vllm_gpu_memory_utilization=0.4,
                remeasure=False, quiet=True, threads=1)
    base.update(kw)
    return DistillConfig(**base)


def test_trainer_trains_on_vllm_rollouts_and_keeps_vllm_in_sync(fake_vllm_module, tiny_model_dir, tmp_path):
    fake_vllm_module.state["factory"] = lambda **kw: HFBackedLLM(**kw)
    d = Distiller(vllm_cfg(tiny_model_dir, tmp_path / "run"))
    [(kwargs, llm)] = fake_vllm_module.made  # built by the trainer from the config, at start
    assert kwargs["seed"] == 0 and kwargs["model"] == str(tiny_model_dir) and "kv_cache_memory_bytes" in kwargs
    assert kwargs["dtype"] == "float32" == d.cfg.vllm_dtype  # the trainer's compute dtype on a CPU, resolved
    assert "vllm_dtype: float32" in (tmp_path / "run" / "config.yaml").read_text()
    assert isinstance(d.engine, VLLMRolloutEngine) and d.engine.eos_ids == [eos_id(d.processor)]
    start = {n: p.detach().clone() for n, p in d.model.named_parameters()}
    history = [d.train_step(k) for k in range(2)]
    # the student moved, and after each update vLLM's copy was set to exactly the student's weights
    assert any(not torch.equal(p, start[n]) for n, p in d.model.named_parameters())
    for n, p in d.model.named_parameters():
        assert torch.equal(llm.params[n], p), n
    saved = load_file(tiny_model_dir / "model.safetensors")
    assert len(llm.loaded) == 2 and llm.loaded[0] == {k: tuple(v.shape) for k, v in saved.items()}
    assert llm.resets == 4  # the prefix and encoder caches, at each sync
    # vLLM's log-probs are the behaviour policy of the importance weight: the rollouts come from the synced
    # weights, so the weight is 1 at step 1 and at step 2 (a stale vLLM would give another value at step 2)
    for s in history:
        assert s.is_weight == pytest.approx(1.0, abs=1e-4) and s.tokens > 0 and math.isfinite(s.grad_norm)


def test_without_the_sync_vllm_goes_stale_and_the_weight_shows_it(fake_vllm_module, tiny_model_dir, tmp_path):
    """The control for the test above: the same run with a sync that does nothing."""
    fake_vllm_module.state["factory"] = lambda **kw: HFBackedLLM(**kw)
    d = Distiller(vllm_cfg(tiny_model_dir, tmp_path / "stale"))
    d.engine.sync_weights = lambda model: None
    first, second = d.train_step(0), d.train_step(1)
    assert first.is_weight == pytest.approx(1.0, abs=1e-4)
    assert abs(second.is_weight - 1.0) > 1e-3


def test_importance_weight_uses_the_returned_logprobs(fake_vllm_module, tiny_model_dir, tmp_path):
    """vLLM reporting every token 1.5× less likely than the student finds it: each weight is exactly 1.5."""
    fake_vllm_module.state["factory"] = lambda **kw: HFBackedLLM(logprob_shift=-math.log(1.5), **kw)
    d = Distiller(vllm_cfg(tiny_model_dir, tmp_path / "shift", steps=1))
    assert d.train_step(0).is_weight == pytest.approx(1.5, abs=1e-3)


def test_lora_run_syncs_the_merged_adapter_and_resume_resyncs(fake_vllm_module, tiny_model_dir, tmp_path):
    fake_vllm_module.state["factory"] = lambda **kw: HFBackedLLM(**kw)
    cfg = vllm_cfg(tiny_model_dir, tmp_path / "lora", lora=True, lora_rank=4, steps=1, save_every=1)
    d = Distiller(cfg)
    d.train_step(0)
    d.step = 1
    d.save_state()
    llm = fake_vllm_module.made[-1][1]
    merged = dict(copy.deepcopy(d.model).merge_and_unload().named_parameters())
    for n, p in llm.params.items():
        torch.testing.assert_close(p, merged[n], rtol=0, atol=1e-6)
    assert all("lora" not in k and "base_layer" not in k for k in llm.loaded[0])
    # a resumed run starts a fresh vLLM from the starting checkpoint: the trainer syncs it before any rollout
    resumed = Distiller(vllm_cfg(tiny_model_dir, tmp_path / "lora", lora=True, lora_rank=4, steps=2, save_every=1))
    fresh = fake_vllm_module.made[-1][1]
    assert resumed.step == 1 and len(fresh.loaded) == 1
    for n, p in fresh.params.items():
        torch.testing.assert_close(p, merged[n], rtol=0, atol=1e-6)


def test_the_engine_samples_in_the_trainers_compute_dtype_unless_told(fake_vllm_module, tiny_model_dir, tmp_path):
    from vopd_train.rollout_vllm import trainer_compute_dtype

    assert trainer_compute_dtype("float32", "cpu") == "float32"  # the trainer scores in float32 here
    assert trainer_compute_dtype("float32", "cuda:0") == "bfloat16"  # float32 master weights under bf16 autocast
    assert trainer_compute_dtype("bfloat16", "cpu") == "bfloat16"
    Distiller(vllm_cfg(tiny_model_dir, tmp_path / "asked", vllm_dtype="bfloat16"))
    assert fake_vllm_module.made[-1][0]["dtype"] == "bfloat16"
    assert "vllm_dtype: bfloat16" in (tmp_path / "asked" / "config.yaml").read_text()


def test_gradients_are_freed_before_the_sync_gathers(fake_vllm_module, tiny_model_dir, tmp_path):
    """A sync gathers the weights while the trainer holds its state: the gradients must be gone by then."""
    fake_vllm_module.state["factory"] = lambda **kw: HFBackedLLM(**kw)
    d = Distiller(vllm_cfg(tiny_model_dir, tmp_path / "grads", steps=1))
    seen = []
    load = d.engine.llm.load_weights

    def recording(weights):
        seen.append(sum(p.grad is not None for p in d.model.parameters()))
        load(weights)

    d.engine.llm.load_weights = recording
    d.engine.llm.worker = fake_vllm.Worker(SimpleNamespace(load_weights=recording, modules=lambda: []))
    d.train_step(0)
    assert seen == [0]


def test_close_shuts_the_engine_down_now_or_when_the_trainers_group_goes(fake_vllm_module, tiny, prompts):
    """vLLM's engine shutdown tears down the process's default group: in one process that group is vLLM's own
    (shut down now, before vopd destroys it at exit, which would leave vLLM's own shutdown a traceback); under
    torchrun it is the trainer's, so the engine goes when vopd leaves the group (`distributed.shutdown`)."""
    from vopd_bench import distributed
    from vopd_bench.distributed import Place

    _, processor = tiny
    stopped = []

    def engine(place):
        e = VLLMRolloutEngine("toy", processor, place=place, llm=ScriptedLLM())
        e.llm.llm_engine.engine_core = SimpleNamespace(shutdown=lambda: stopped.append(place.rank))
        return e

    engine(Place()).close()
    assert stopped == [0]
    engine(Place(rank=1, world_size=2, local_rank=1)).close()
    assert stopped == [0]  # not yet: the trainer still needs its process group
    distributed.shutdown()
    assert stopped == [0, 1]


def test_a_sync_redoes_the_processing_of_tied_layers_only():
    """vLLM's in-place reload never loads a tied LM head itself; on a CPU its kernel keeps a packed copy of the
    starting matrix (tests/real_vllm/ saw the logits come from the old embeddings) unless it is processed again."""
    from vopd_train.rollout_vllm import refresh_tied_layers

    redone = []

    class Method:
        def process_weights_after_loading(self, layer):
            redone.append(layer.tag)

    def layer(tag, weight):
        m = torch.nn.Module()
        m.weight, m.quant_method, m.tag = weight, Method(), tag
        return m

    shared = torch.nn.Parameter(torch.ones(4, 2))
    model = torch.nn.ModuleList([layer("embed", shared), layer("head", shared),
                                 layer("mlp", torch.nn.Parameter(torch.ones(2, 2)))])
    assert refresh_tied_layers(fake_vllm.Worker(model)) == 2 and sorted(redone) == ["embed", "head"]


# ---------------------------------------------------------------------- tensor-parallel engines (--vllm-tensor-parallel-size)


def test_tensor_parallel_size_is_refused_in_one_line_before_any_work(fake_vllm_module, tiny, tiny_model_dir,
                                                                     tmp_path, monkeypatch):
    """K must be ≥ 1 and divide the ranks; K > 1 in one process is refused (one rank per device). All before the
    data, the model or an engine loads; the CLI exits non-zero with the one line (`vopd distill ...
    --vllm-tensor-parallel-size -1` prints `error: --vllm-tensor-parallel-size must be ≥ 1`, exit status 1)."""
    import vopd_train.trainer as trainer
    from vopd_bench.cli import _register_commands, app
    from vopd_bench.distributed import Place
    from vopd_train.rollout_vllm import check_tensor_parallel

    for k, world in ((1, 1), (1, 3), (2, 2), (2, 4), (4, 4)):
        check_tensor_parallel(k, world)
    for k, world, why in ((0, 2, "must be ≥ 1"), (-2, 4, "must be ≥ 1"), (3, 4, r"must divide the number of ranks \(4\)"),
                          (2, 1, "needs torchrun with a multiple of 2 ranks")):
        with pytest.raises(VopdError, match=why):
            check_tensor_parallel(k, world)

    def no_data(*a, **k):
        raise AssertionError("the data was loaded before the refusal")

    monkeypatch.setattr(trainer, "load_prompts", no_data)
    with pytest.raises(VopdError, match=r"^--vllm-tensor-parallel-size 2 needs torchrun .* one rank per device"):
        Distiller(vllm_cfg(tiny_model_dir, tmp_path / "one", vllm_tensor_parallel_size=2))
    with pytest.raises(VopdError, match=r"^--vllm-tensor-parallel-size must be ≥ 1$"):
        Distiller(vllm_cfg(tiny_model_dir, tmp_path / "zero", vllm_tensor_parallel_size=0))
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")):  # torchrun's environment
        monkeypatch.setenv(name, value)
    with pytest.raises(VopdError, match=r"^--vllm-tensor-parallel-size 3 must divide the number of ranks \(4\)$"):
        Distiller(vllm_cfg(tiny_model_dir, tmp_path / "three", vllm_tensor_parallel_size=3))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    _, processor = tiny
    with pytest.raises(VopdError, match="must divide the number of ranks"):  # the engine checks too
        VLLMRolloutEngine("toy", processor, tensor_parallel_size=3, place=Place(0, 4, 0))
    assert fake_vllm_module.made == []

    _register_commands()
    res = CliRunner().invoke(app, ["distill", str(tiny_model_dir), "--data", "synthetic:train", "--out",
                                   str(tmp_path / "cli"), "--rollout-engine", "vllm",
                                   "--vllm-tensor-parallel-size", "-1"])
    # the VopdError that `vopd`'s main prints as one line ("error: ...") with exit status 1
    assert res.exit_code != 0 and isinstance(res.exception, VopdError), res.output
    assert str(res.exception) == "--vllm-tensor-parallel-size must be ≥ 1"


class SeededLLM(fake_vllm.LLM):
    """Answers as a seeded engine does: each sample's tokens depend only on its prompt's text and seed, not on the
    other requests of the call; records the calls."""

    def answer(self, prompt, params):
        comps = []
        for j in range(params.n):
            rng = random.Random(f"{prompt['prompt']}|{params.seed + j}")
            comps.append(fake_vllm.completion([rng.randrange(40, 90) for _ in range(3)],
                                              [-rng.random() for _ in range(3)], index=j))
        return fake_vllm.RequestOutput("0", prompt["prompt"], None, None, comps)


def thread_groups(world: int, k: int):
    """all_gather_object within groups of k consecutive simulated ranks, each rank a thread."""
    import threading

    barriers = [threading.Barrier(k, timeout=30) for _ in range(world // k)]
    boxes = [[None] * k for _ in range(world // k)]

    def for_rank(rank: int):
        g, i = divmod(rank, k)

        def gather(obj):
            boxes[g][i] = obj
            barriers[g].wait()
            out = list(boxes[g])
            barriers[g].wait()  # nobody overwrites its box before every rank has read the group's
            return out

        return gather

    return for_rank


def test_tensor_parallel_ranks_generate_their_groups_prompts_and_keep_their_own(fake_vllm_module, tiny):
    """Four ranks, K = 2: groups {0, 1} and {2, 3}. Every rank's engine is asked its group's prompts and seeds in
    rank order (the ranks of one engine must be handed the same requests); each rank keeps exactly its own
    rollouts, numbered as its own prompts, equal to what a K = 1 engine gives for them. A rank with no prompt
    still takes part. Each engine is seeded by its group, its ranks alike."""
    import threading

    from vopd_bench.distributed import Place

    _, processor = tiny
    fake_vllm_module.state["factory"] = lambda **kw: SeededLLM(**kw)
    texts = [f"What is in box {i}?" for i in range(6)]
    images = [Image.new("RGB", (64 + 8 * i, 64), (40 * i, 30, 30)) for i in range(6)]
    every = encode_prompts(processor, images, texts)
    counts = [2, 1, 0, 3]  # uneven, one empty: a wrong offset or order cannot go unseen
    starts = [sum(counts[:r]) for r in range(4)]
    own = [every[s:s + c] for s, c in zip(starts, counts, strict=True)]
    seeds = [[1000 + 17 * (s + i) for i in range(c)] for s, c in zip(starts, counts, strict=True)]
    gather = thread_groups(4, 2)
    engines = [VLLMRolloutEngine("toy", processor, seed=7, place=Place(r, 4, r), tensor_parallel_size=2,
                                 group_gather=gather(r)) for r in range(4)]
    for e in engines:
        _ = e.llm  # started one at a time, as the trainer starts them before its first step
    assert [e.llm.kwargs["seed"] for e in engines] == [7, 7, 8, 8]
    assert all(e.llm.kwargs["tensor_parallel_size"] == 2 for e in engines)
    assert all(e.llm.kwargs["distributed_executor_backend"] == "external_launcher" for e in engines)
    got: dict[int, list] = {}

    def run(r):
        got[r] = engines[r].generate(own[r], SamplingSettings(n=2, max_new_tokens=3, prompt_seeds=tuple(seeds[r])))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    group_texts = [[p.text for p in every[:3]]] * 2 + [[p.text for p in every[3:]]] * 2
    group_seeds = [seeds[0] + seeds[1]] * 2 + [seeds[2] + seeds[3]] * 2
    for r, e in enumerate(engines):
        [call] = e.llm.calls
        assert [p["prompt"] for p in call["prompts"]] == group_texts[r]
        assert [sp.seed for sp in call["sampling_params"]] == group_seeds[r]
        alone = VLLMRolloutEngine("toy", processor, llm=SeededLLM("m")).generate(
            own[r], SamplingSettings(n=2, max_new_tokens=3, prompt_seeds=tuple(seeds[r])))
        assert got[r] == alone and len(got[r]) == 2 * counts[r]
        assert [x.prompt_index for x in got[r]] == [i for i in range(counts[r]) for _ in range(2)]
