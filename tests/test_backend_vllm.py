"""The `vllm` backend through tests/fake_vllm.py, which follows vLLM 0.33.0's API (test_vllm_conformance.py checks
it against the real package). These tests pin down what the backend asks of vLLM; tests/real_vllm/ compares its
answers with the hf backend's on a real engine."""

import sys
import types

import fake_vllm
import pytest
from PIL import Image

from vopd_bench.backends import get_backend
from vopd_bench.backends.base import GenerationConfig, Request
from vopd_bench.backends.vllm import VLLMBackend
from vopd_bench.errors import VopdError


class ChatLLM(fake_vllm.LLM):
    """Answers each conversation with its prompt reversed and the image width; a prompt containing "too long" is
    rejected as vLLM 0.33 rejects one past max_model_len (VLLMValidationError, not a ValueError)."""

    def answer_chat(self, conversation, params):
        image, text = conversation[0]["content"]
        if "too long" in text["text"]:
            raise fake_vllm.VLLMValidationError("The decoder prompt (length 9000) is longer than the maximum model "
                                                "length of 4096.\nmore")
        done = fake_vllm.completion([5, 6], text=f" {text['text'][::-1]}|{image['image_pil'].width}\n")
        return fake_vllm.RequestOutput("0", None, None, None, [done])


@pytest.fixture
def fake_engines(monkeypatch):
    """Engines on a (fake) GPU platform; `cpu_engines` below for vLLM's CPU release."""
    engines = []

    def make_llm(*args, **kwargs):
        llm = ChatLLM(*args, **kwargs)
        engines.append(llm)
        return llm

    fake_vllm.install(monkeypatch, make_llm, fake_vllm.Platform("cuda"))
    return engines


def _req(i: int, prompt: str = "what colour?") -> Request:
    return Request(str(i), Image.new("RGB", (20 + i, 10), "red"), prompt)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    return tmp_path


def test_engine_arguments(fake_engines, model_dir):
    VLLMBackend(str(model_dir), tensor_parallel_size=4, max_model_len=8192, seed=3,
                gpu_memory_utilization=0.8, dtype="bfloat16")
    [llm] = fake_engines
    assert llm.kwargs == {"model": str(model_dir), "tensor_parallel_size": 4, "max_model_len": 8192, "seed": 3,
                          "gpu_memory_utilization": 0.8, "dtype": "bfloat16", "trust_remote_code": False,
                          "limit_mm_per_prompt": {"image": 1}, "enforce_eager": False, "generation_config": "vllm"}


def test_defaults_and_remote_code_only_when_asked(fake_engines):
    VLLMBackend("org/model")
    VLLMBackend("org/model", trust_remote_code=True, mm_processor_kwargs={"max_pixels": 1003520})
    plain, remote = fake_engines
    assert plain.kwargs["tensor_parallel_size"] == 1 and "max_model_len" not in plain.kwargs
    # the hf backend's dtype (float32 without a bf16 GPU), never vLLM's "auto" (the checkpoint's)
    assert plain.kwargs["trust_remote_code"] is False and plain.kwargs["dtype"] == "float32"
    assert remote.kwargs["trust_remote_code"] is True and remote.kwargs["mm_processor_kwargs"] == {"max_pixels": 1003520}


def test_messages_sampling_params_and_template_kwargs(fake_engines):
    backend = VLLMBackend("org/model")
    reqs = [_req(0, "what colour?"), _req(1, "which shape?")]
    gen = GenerationConfig(max_new_tokens=12, seed=7, chat_template_kwargs={"enable_thinking": False})
    out = backend.generate(reqs, gen)
    [call] = fake_engines[0].calls  # one batched call for the whole batch
    assert [r.text for r in out] == ["?ruoloc tahw|20", "?epahs hcihw|21"] and all(r.error is None for r in out)
    [conv0, conv1] = call["messages"]
    assert conv0 == [{"role": "user", "content": [{"type": "image_pil", "image_pil": reqs[0].image},
                                                  {"type": "text", "text": "what colour?"}]}]
    assert conv1[0]["content"][0]["image_pil"] is reqs[1].image
    assert call["sampling_params"] == fake_vllm.SamplingParams(temperature=0.0, max_tokens=12, seed=7)
    assert call["chat_template_kwargs"] == {"enable_thinking": False} and call["use_tqdm"] is False


def test_no_template_kwargs_sends_none(fake_engines):
    backend = VLLMBackend("org/model")
    backend.generate([_req(0)], GenerationConfig(temperature=0.7, seed=1))
    [call] = fake_engines[0].calls
    assert call["chat_template_kwargs"] is None
    assert call["sampling_params"] == fake_vllm.SamplingParams(temperature=0.7, max_tokens=64, seed=1)


def test_a_failing_prompt_is_isolated(fake_engines):
    backend = VLLMBackend("org/model")
    out = backend.generate([_req(0, "fine"), _req(1, "way too long"), _req(2, "ok")], GenerationConfig())
    assert [r.text for r in out] == ["enif|20", "", "ko|22"]
    assert out[1].error == "VLLMValidationError: The decoder prompt (length 9000) is longer than the maximum model length of 4096."
    assert len(fake_engines[0].calls) == 4  # the batch, then each prompt alone


def test_injected_engine_is_used_as_is(fake_engines):
    engine = ChatLLM("org/model")
    backend = VLLMBackend("org/model", engine=engine)
    assert fake_engines == [] and backend.llm is engine
    assert backend.generate([_req(3, "ab")], GenerationConfig())[0].text == "ba|23"


def test_registry_and_wide_batches(fake_engines):
    backend = get_backend("vllm", "org/model", trust_remote_code=False, batch_size=16, tensor_parallel_size=2)
    assert backend.name == "vllm" and backend.preferred_batch_size >= 256
    assert fake_engines[0].kwargs["tensor_parallel_size"] == 2


def _folder_hash(folder) -> str:
    """The documented fingerprint of a local folder, computed here by hand: sha256 over each model file's name,
    size and bytes, in name order, first 16 hex digits."""
    import hashlib

    h = hashlib.sha256()
    for name, data in (("config.json", b'{"model_type": "qwen2_vl"}'), ("model.safetensors", b"weights v1")):
        assert (folder / name).read_bytes() == data
        h.update(name.encode() + str(len(data)).encode() + data)
    return "sha256:" + h.hexdigest()[:16]


def test_fingerprint_hashes_local_weights_and_names_vllm(fake_engines, model_dir):
    first = VLLMBackend(str(model_dir), dtype="bfloat16").fingerprint()
    assert first == f"vllm:{_folder_hash(model_dir)}:bfloat16"
    assert VLLMBackend(str(model_dir)).fingerprint() == f"vllm:{_folder_hash(model_dir)}:float32"
    (model_dir / "notes.md").write_text("not part of the model")  # only model files count
    assert VLLMBackend(str(model_dir), dtype="bfloat16").fingerprint() == first
    (model_dir / "model.safetensors").write_bytes(b"weights v2")
    assert VLLMBackend(str(model_dir), dtype="bfloat16").fingerprint() != first  # new weights, new records
    assert VLLMBackend("no-such-org/no-such-model").fingerprint() == "vllm:hub:no-such-org/no-such-model@unknown:float32"


def test_bad_arguments_and_missing_vllm(monkeypatch):
    with pytest.raises(VopdError, match="tensor-parallel-size"):
        VLLMBackend("org/model", tensor_parallel_size=0, engine=ChatLLM("org/model"))
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(VopdError, match=r"pip install 'vopd\[vllm\]'"):
        VLLMBackend("org/model")


def test_engine_start_failure_is_one_line(monkeypatch):
    module = types.ModuleType("vllm")

    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20 GiB\ntraceback lines")

    module.LLM, module.SamplingParams = broken, fake_vllm.SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    with pytest.raises(VopdError) as e:
        VLLMBackend("org/model")
    assert str(e.value) == "vLLM could not load 'org/model': RuntimeError: CUDA out of memory. Tried to allocate 20 GiB"


def test_validation_error_is_not_a_value_error_and_still_per_sample(fake_engines):
    """vLLM 0.33's VLLMValidationError derives from Exception, not ValueError: it must still stay per-sample."""
    assert not issubclass(fake_vllm.VLLMValidationError, ValueError)
    out = VLLMBackend("org/model").generate([_req(0, "too long")], GenerationConfig())
    assert out[0].text == "" and out[0].error.startswith("VLLMValidationError: The decoder prompt (length 9000)")


@pytest.mark.parametrize("temperature", [2.5, 0.005])
def test_temperature_vllm_would_reject_or_change_is_refused_up_front(fake_engines, temperature):
    backend = VLLMBackend("org/model")
    with pytest.raises(VopdError, match=rf"temperature {temperature} is outside what vLLM samples at"):
        backend.generate([_req(0)], GenerationConfig(temperature=temperature))
    assert fake_engines[0].calls == []  # refused before vLLM saw a request
    backend.generate([_req(0)], GenerationConfig(temperature=2.0))  # the limit itself is fine


def test_on_a_cpu_the_engine_gets_a_share_of_what_the_host_can_spare(monkeypatch, model_dir):
    import psutil

    engines = []
    fake_vllm.install(monkeypatch, lambda **kw: engines.append(ChatLLM(**kw)) or engines[-1], fake_vllm.Platform("cpu"))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=8 * 2**30, total=64 * 2**30))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks' engines on this host
    VLLMBackend(str(model_dir), gpu_memory_utilization=0.5)
    [llm] = engines
    assert llm.kwargs["kv_cache_memory_bytes"] == 2 * 2**30
    assert llm.kwargs["gpu_memory_utilization"] == 0.92  # not passed: vLLM's default, unused beside the KV size


class TokenLLM(fake_vllm.LLM):
    """Answers every conversation with the scripted token ids and a text of its own (vLLM's detokenizer)."""

    ids: list[int] = []

    def answer_chat(self, conversation, params):
        return fake_vllm.RequestOutput("0", None, None, None, [fake_vllm.completion(self.ids, text="vLLM's text")])


def test_the_hf_backends_generation_policy(monkeypatch, tiny_model_dir):
    """Stop ids from the generation config, the vision tokens banned, and the answer decoded from its ids by
    the model's processor as the hf backend decodes it, a character cut in half included."""
    from transformers import AutoProcessor
    from transformers import GenerationConfig as HFGenerationConfig

    from vopd_bench.modeling import vision_token_ids

    engines = []
    fake_vllm.install(monkeypatch, lambda **kw: engines.append(TokenLLM(**kw)) or engines[-1],
                      fake_vllm.Platform("cuda"))
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    tok = processor.tokenizer
    cut = tok.encode("red é", add_special_tokens=False)
    assert tok.decode(cut[:-1]) != tok.decode(cut)  # the last token is half of é's two bytes
    TokenLLM.ids = [*cut[:-1], tok.convert_tokens_to_ids("<|im_end|>")]
    backend = VLLMBackend(str(tiny_model_dir))
    [out] = backend.generate([_req(0)], GenerationConfig(max_new_tokens=8))
    assert out.text == processor.batch_decode([TokenLLM.ids], skip_special_tokens=True)[0].strip() != "vLLM's text"
    params = engines[0].calls[0]["sampling_params"]
    eos = HFGenerationConfig.from_pretrained(tiny_model_dir).eos_token_id
    assert params.stop_token_ids == sorted(eos if isinstance(eos, list) else [eos]) and params.detokenize is False
    banned = [tok.convert_tokens_to_ids(w) for w in params.bad_words]
    assert sorted(banned) == vision_token_ids(processor) and len(banned) >= 3
    assert set(backend.policy_differences) == {"kernels"}  # all that remains
