"""Prompt length against the model's context: counted as the processor builds the request, refused before the
model sees it, with bounded work for huge texts; in gap-report (a per-sample error) and in distill (skipped)."""

import json
from types import SimpleNamespace

import pytest
from PIL import Image

from vopd_bench.context import PromptLength, for_model, for_vllm, text_context
from vopd_bench.errors import SampleError
from vopd_bench.modeling import TOY_DIR, encode

HUGE = "What colour is the shape? " + " ".join(f"word{i} lorem ipsum" for i in range(20000))  # ~430k chars


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(TOY_DIR)


@pytest.mark.parametrize("prompt", ["What colour?", "Which shape is red?\n(A) circle\n(B) square", "é ü 漢字 " * 40])
@pytest.mark.parametrize("size", [(224, 224), (97, 301), (640, 480)])
def test_count_equals_the_processors_own_encoding(processor, prompt, size):
    lengths = PromptLength(processor, 4096)
    expected = encode(processor, [Image.new("RGB", size)], [prompt])["input_ids"].shape[1]
    assert lengths.count(prompt, *size) == expected


def test_the_boundary_is_exact(processor):
    """A prompt that leaves exactly max_new_tokens fits; one token more is refused, naming both numbers."""
    prompt, size = "word " * 3000, (224, 224)  # over the byte bound's shortcut: the exact count decides
    n = PromptLength(processor, 10**6).count(prompt, *size)
    PromptLength(processor, n + 32).check(prompt, [size], max_new_tokens=32)
    with pytest.raises(SampleError) as e:
        PromptLength(processor, n + 31).check(prompt, [size], max_new_tokens=32)
    assert str(e.value) == f"prompt is {n} tokens; the model's context is {n + 31} ({n - 1} left after 32 new tokens)"


def test_each_image_is_its_own_sequence(processor):
    """The student's image and the teacher's larger crop: the check fails on the larger one alone."""
    lengths = PromptLength(processor, 4096)
    lengths.image_tokens = lambda w, h: w * h // 256  # the toy's processor resizes every image to one size
    small, large = lengths.count("q", 64, 64), lengths.count("q", 1024, 1024)
    assert large - small == (1024 * 1024 - 64 * 64) // 256
    lengths.context = small + 1
    lengths.check("q", [(64, 64)], max_new_tokens=1)
    with pytest.raises(SampleError, match=f"prompt is {large} tokens"):
        lengths.check("q", [(64, 64), (1024, 1024)], max_new_tokens=1)


def test_a_huge_prompt_is_refused_after_tokenising_a_prefix_only(processor):
    seen: list[int] = []
    tokenizer = processor.tokenizer

    class Recording:
        def __call__(self, text, *a, **k):
            seen.append(len(text))
            return tokenizer(text, *a, **k)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    lengths = PromptLength(processor, 4096)
    lengths._tokenizer = Recording()
    with pytest.raises(SampleError, match=r"^prompt is more than \d+ tokens; the model's context is 4096"):
        lengths.check(HUGE, [(224, 224)], max_new_tokens=32)
    assert seen and sum(seen) < 20 * 4096 + 1000 * len(seen) < len(HUGE)  # prefixes: 2, then 8 × the budget


def test_short_prompts_pass_without_tokenising(processor):
    lengths = PromptLength(processor, 4096)
    lengths._tokenizer = None  # any tokeniser call would fail
    lengths.check("What colour is the triangle?\n(A) red\n(B) blue", [(224, 224)], max_new_tokens=32)


def test_context_comes_from_the_text_config_or_vllm(processor, tiny_model_dir):
    from transformers import AutoConfig

    assert text_context(AutoConfig.from_pretrained(TOY_DIR)) == 4096
    assert for_model(AutoConfig.from_pretrained(TOY_DIR), processor).context == 4096
    engine = SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(max_model_len=1234)))
    lengths = for_vllm(engine, str(tiny_model_dir))
    assert lengths.context == 1234 and lengths.source == "max_model_len"
    assert for_vllm(object(), str(tiny_model_dir)) is None  # an engine that does not say: vLLM's own check


def _local_bench(tmp_path):
    Image.new("RGB", (224, 224), "white").save(tmp_path / "img.png")
    rows = [{"id": "huge", "image": "img.png", "question": HUGE, "options": ["red", "blue"], "answer": "A",
             "bbox": [10, 10, 60, 60]},
            {"id": "ok", "image": "img.png", "question": "What colour?", "options": ["red", "blue"], "answer": "A",
             "bbox": [10, 10, 60, 60]}]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gap_report_records_an_over_long_prompt_as_a_sample_error_and_never_sends_it(tmp_path, monkeypatch,
                                                                                      one_thread):
    from vopd_bench import runner
    from vopd_bench.backends.hf import HFBackend
    from vopd_bench.runner import GapReportConfig, run_gap_report

    monkeypatch.setattr(runner, "write_outputs", lambda *a, **k: None)
    backend = HFBackend("toy")
    sent: list[str] = []
    generate = backend.generate
    backend.generate = lambda reqs, gen: (sent.extend(r.prompt for r in reqs), generate(reqs, gen))[1]
    result = run_gap_report(GapReportConfig(model="toy", benchmarks=[f"local:{_local_bench(tmp_path)}"],
                                            out=str(tmp_path / "out"), quiet=True, max_new_tokens=4),
                            backend=backend)
    by = {(r.sample_id, r.view): r for r in result.records}
    assert len(by) == 6 and len(sent) == 3 and all(HUGE not in p for p in sent)
    for view in ("full", "crop", "box"):
        assert by[("huge", view)].error_kind == "sample"
        assert by[("huge", view)].error.startswith("prompt is more than ")
        assert "the model's context is 4096 (4092 left after 4 new tokens)" in by[("huge", view)].error
        assert by[("ok", view)].error is None


def test_distill_skips_an_over_long_prompt_with_its_reason(tmp_path, one_thread):
    from vopd_train.config import DistillConfig
    from vopd_train.trainer import Distiller

    cfg = DistillConfig(model="toy", data=f"local:{_local_bench(tmp_path)}", out=str(tmp_path / "run"),
                        max_new_tokens=4, n_rollouts=1, batch_size=2, steps=1, remeasure=False, threads=1)
    trainer = Distiller(cfg)
    students, teachers = trainer._render([0, 1])
    assert len(students) == len(teachers) == 1
    (pid, reason), = trainer.skipped.items()
    assert pid.endswith("/huge") and reason.startswith("prompt is more than ")
    assert "the model's context is 4096 (4092 left after 4 new tokens)" in reason
