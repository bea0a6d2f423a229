"""The `vllm` backend through a fake `vllm` module that honours the calls it makes (`LLM(...)`, `LLM.chat`,
`SamplingParams`). Real vLLM needs a GPU; these tests pin down what the backend asks of it."""

import sys
import types
from dataclasses import dataclass, field

import pytest
from PIL import Image

from vopd_bench.backends import get_backend
from vopd_bench.backends.base import GenerationConfig, Request
from vopd_bench.backends.vllm import VLLMBackend
from vopd_bench.errors import VopdError


@dataclass
class FakeSamplingParams:
    temperature: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None


@dataclass
class FakeCompletion:
    text: str


@dataclass
class FakeRequestOutput:
    outputs: list[FakeCompletion]


@dataclass
class FakeLLM:
    """Records its construction and every chat call; answers each conversation with its prompt reversed and the
    image width, or raises for prompts containing "too long" (as vLLM does past max_model_len)."""

    kwargs: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)

    def chat(self, messages, sampling_params=None, use_tqdm=True, chat_template_kwargs=None, **kw):
        self.calls.append({"messages": messages, "sampling_params": sampling_params, "use_tqdm": use_tqdm,
                           "chat_template_kwargs": chat_template_kwargs, **kw})
        outs = []
        for conv in messages:
            image, text = conv[0]["content"]
            if "too long" in text["text"]:
                raise ValueError("The decoder prompt (length 9000) is longer than the maximum model length of 4096.\nmore")
            outs.append(FakeRequestOutput([FakeCompletion(f" {text['text'][::-1]}|{image['image_pil'].width}\n")]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    engines = []

    def make_llm(**kwargs):
        llm = FakeLLM(kwargs=kwargs)
        engines.append(llm)
        return llm

    module = types.ModuleType("vllm")
    module.LLM = make_llm
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return engines


def _req(i: int, prompt: str = "what colour?") -> Request:
    return Request(str(i), Image.new("RGB", (20 + i, 10), "red"), prompt)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    return tmp_path


def test_engine_arguments(fake_vllm, model_dir):
    VLLMBackend(str(model_dir), tensor_parallel_size=4, max_model_len=8192, seed=3,
                gpu_memory_utilization=0.8, dtype="bfloat16")
    [llm] = fake_vllm
    assert llm.kwargs == {"model": str(model_dir), "tensor_parallel_size": 4, "max_model_len": 8192, "seed": 3,
                          "gpu_memory_utilization": 0.8, "dtype": "bfloat16", "trust_remote_code": False,
                          "limit_mm_per_prompt": {"image": 1}, "enforce_eager": False}


def test_defaults_and_remote_code_only_when_asked(fake_vllm):
    VLLMBackend("org/model")
    VLLMBackend("org/model", trust_remote_code=True, mm_processor_kwargs={"max_pixels": 1003520})
    plain, remote = fake_vllm
    assert plain.kwargs["tensor_parallel_size"] == 1 and "max_model_len" not in plain.kwargs
    assert plain.kwargs["trust_remote_code"] is False and plain.kwargs["dtype"] == "auto"
    assert remote.kwargs["trust_remote_code"] is True and remote.kwargs["mm_processor_kwargs"] == {"max_pixels": 1003520}


def test_messages_sampling_params_and_template_kwargs(fake_vllm):
    backend = VLLMBackend("org/model")
    reqs = [_req(0, "what colour?"), _req(1, "which shape?")]
    gen = GenerationConfig(max_new_tokens=12, seed=7, chat_template_kwargs={"enable_thinking": False})
    out = backend.generate(reqs, gen)
    [call] = fake_vllm[0].calls  # one batched call for the whole batch
    assert [r.text for r in out] == ["?ruoloc tahw|20", "?epahs hcihw|21"] and all(r.error is None for r in out)
    [conv0, conv1] = call["messages"]
    assert conv0 == [{"role": "user", "content": [{"type": "image_pil", "image_pil": reqs[0].image},
                                                  {"type": "text", "text": "what colour?"}]}]
    assert conv1[0]["content"][0]["image_pil"] is reqs[1].image
    assert call["sampling_params"] == FakeSamplingParams(temperature=0.0, max_tokens=12, seed=7)
    assert call["chat_template_kwargs"] == {"enable_thinking": False} and call["use_tqdm"] is False


def test_no_template_kwargs_sends_none(fake_vllm):
    backend = VLLMBackend("org/model")
    backend.generate([_req(0)], GenerationConfig(temperature=0.7, seed=1))
    [call] = fake_vllm[0].calls
    assert call["chat_template_kwargs"] is None
    assert call["sampling_params"] == FakeSamplingParams(temperature=0.7, max_tokens=64, seed=1)


def test_a_failing_prompt_is_isolated(fake_vllm):
    backend = VLLMBackend("org/model")
    out = backend.generate([_req(0, "fine"), _req(1, "way too long"), _req(2, "ok")], GenerationConfig())
    assert [r.text for r in out] == ["enif|20", "", "ko|22"]
    assert out[1].error == "ValueError: The decoder prompt (length 9000) is longer than the maximum model length of 4096."
    assert len(fake_vllm[0].calls) == 4  # the batch, then each prompt alone


def test_injected_engine_is_used_as_is(fake_vllm):
    engine = FakeLLM()
    backend = VLLMBackend("org/model", engine=engine)
    assert fake_vllm == [] and backend.llm is engine
    assert backend.generate([_req(3, "ab")], GenerationConfig())[0].text == "ba|23"


def test_registry_and_wide_batches(fake_vllm):
    backend = get_backend("vllm", "org/model", trust_remote_code=False, batch_size=16, tensor_parallel_size=2)
    assert backend.name == "vllm" and backend.preferred_batch_size >= 256
    assert fake_vllm[0].kwargs["tensor_parallel_size"] == 2


def _folder_hash(folder) -> str:
    """The documented fingerprint of a local folder, computed here by hand: sha256 over each model file's name,
    size and bytes, in name order, first 16 hex digits."""
    import hashlib

    h = hashlib.sha256()
    for name, data in (("config.json", b'{"model_type": "qwen2_vl"}'), ("model.safetensors", b"weights v1")):
        assert (folder / name).read_bytes() == data
        h.update(name.encode() + str(len(data)).encode() + data)
    return "sha256:" + h.hexdigest()[:16]


def test_fingerprint_hashes_local_weights_and_names_vllm(fake_vllm, model_dir):
    first = VLLMBackend(str(model_dir), dtype="bfloat16").fingerprint()
    assert first == f"vllm:{_folder_hash(model_dir)}:bfloat16"
    assert VLLMBackend(str(model_dir)).fingerprint() == f"vllm:{_folder_hash(model_dir)}:auto"
    (model_dir / "notes.md").write_text("not part of the model")  # only model files count
    assert VLLMBackend(str(model_dir), dtype="bfloat16").fingerprint() == first
    (model_dir / "model.safetensors").write_bytes(b"weights v2")
    assert VLLMBackend(str(model_dir), dtype="bfloat16").fingerprint() != first  # new weights, new records
    assert VLLMBackend("no-such-org/no-such-model").fingerprint() == "vllm:hub:no-such-org/no-such-model@unknown:auto"


def test_bad_arguments_and_missing_vllm(monkeypatch):
    with pytest.raises(VopdError, match="tensor-parallel-size"):
        VLLMBackend("org/model", tensor_parallel_size=0, engine=FakeLLM())
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(VopdError, match=r"pip install 'vopd\[vllm\]'"):
        VLLMBackend("org/model")


def test_engine_start_failure_is_one_line(monkeypatch):
    module = types.ModuleType("vllm")

    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20 GiB\ntraceback lines")

    module.LLM, module.SamplingParams = broken, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    with pytest.raises(VopdError) as e:
        VLLMBackend("org/model")
    assert str(e.value) == "vLLM could not load 'org/model': RuntimeError: CUDA out of memory. Tried to allocate 20 GiB"
