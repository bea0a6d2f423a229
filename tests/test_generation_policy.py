"""One decoding policy for both backends: the model's generation_config sampling defaults do not apply.

The tiny model here ships a generation_config.json like Qwen2.5-VL's (repetition_penalty 1.05, top_k, top_p,
temperature). The `hf` backend's settings are read back as transformers resolves them inside `generate`; the
`vllm` backend's are the SamplingParams it hands vLLM (tests/fake_vllm.py follows vLLM's class). Both must be the
same, and neither may carry the model's defaults.
"""

from __future__ import annotations

import json
import shutil

import fake_vllm
import pytest
from PIL import Image

from vopd_bench.backends.base import GenerationConfig, Request, decoding_settings
from vopd_bench.backends.hf import HFBackend
from vopd_bench.backends.vllm import VLLMBackend

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_DEFAULTS = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1, "top_p": 0.001}


@pytest.fixture(scope="module")
def model_with_defaults(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("with-defaults") / "m"
    shutil.copytree(tiny_model_dir, path)
    gen_file = path / "generation_config.json"
    config = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    gen_file.write_text(json.dumps({**config, **MODEL_DEFAULTS}))
    return path


def hf_effective(backend: HFBackend, gen: GenerationConfig, monkeypatch) -> dict:
    """What transformers actually decodes with: the generation config `generate` resolves from our keywords."""
    seen = {}
    model = backend.model
    real = model.generate

    def spy(**kwargs):
        inputs = {k: kwargs[k] for k in ("input_ids", "attention_mask")}
        resolved, _ = model._prepare_generation_config(None, **{k: v for k, v in kwargs.items() if k not in inputs})
        seen["config"] = resolved
        return real(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    [resp] = backend.generate([Request("0", Image.new("RGB", (56, 56), "red"), "What colour?")], gen)
    assert resp.error is None, resp.error
    c = seen["config"]
    greedy = not c.do_sample
    return {"greedy": greedy, "temperature": 0.0 if greedy else c.temperature, "top_p": 1.0 if greedy else c.top_p,
            "top_k_off": greedy or not c.top_k, "repetition_penalty": c.repetition_penalty,
            "max_new_tokens": c.max_new_tokens}


def vllm_effective(gen: GenerationConfig, monkeypatch) -> dict:
    class Answering(fake_vllm.LLM):
        def answer_chat(self, conversation, params):
            return fake_vllm.RequestOutput("0", None, None, None, [fake_vllm.completion([1], text="red")])

    made = []
    fake_vllm.install(monkeypatch, lambda **kw: made.append(Answering(**kw)) or made[-1])
    backend = VLLMBackend("org/model")
    [engine] = made
    backend.generate([Request("0", Image.new("RGB", (56, 56), "red"), "What colour?")], gen)
    assert engine.kwargs["generation_config"] == "vllm"  # vLLM's neutral defaults, not the model's file
    p = engine.calls[0]["sampling_params"]
    return {"greedy": p.temperature == 0, "temperature": p.temperature, "top_p": p.top_p, "top_k_off": p.top_k in (0, -1),
            "repetition_penalty": p.repetition_penalty, "max_new_tokens": p.max_tokens}


@pytest.mark.parametrize("gen", [GenerationConfig(max_new_tokens=3), GenerationConfig(max_new_tokens=3, temperature=0.7)],
                         ids=["greedy", "sampled"])
def test_both_backends_decode_with_identical_settings(model_with_defaults, gen, monkeypatch):
    hf = hf_effective(HFBackend(str(model_with_defaults), device="cpu", dtype="float32"), gen, monkeypatch)
    vllm = vllm_effective(gen, monkeypatch)
    assert hf == vllm
    want = decoding_settings(gen)
    assert hf == {"greedy": want["greedy"], "temperature": gen.temperature, "top_p": 1.0, "top_k_off": True,
                  "repetition_penalty": 1.0, "max_new_tokens": 3}


def test_the_model_defaults_are_really_there_without_the_policy(model_with_defaults):
    """The control: transformers left alone picks up the file's repetition_penalty and sampling settings."""
    model = HFBackend(str(model_with_defaults), device="cpu", dtype="float32").model
    resolved, _ = model._prepare_generation_config(None, max_new_tokens=3)
    assert (resolved.repetition_penalty, resolved.top_k, resolved.do_sample) == (1.05, 1, True)
