"""The family matrix: every tiny VLM family through the family-agnostic input layer, gap-report and distill.

Each family's checkpoint is built once per session (`tiny_family_dir`) and loaded once per module (the
module-scoped `fam` fixture groups the tests by family).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tiny_fixtures import tiny_family_dir  # noqa: F401

from vopd_bench.families import GENERIC
from vopd_bench.modeling import load_model, vision_token_ids
from vopd_bench.tiny import TINY_FAMILIES, tiny_vision_tokens
from vopd_train.rollout import (
    HFRolloutEngine,
    SamplingSettings,
    build_sequences,
    encode_prompts,
    lm_head,
    model_family,
    response_hidden,
)

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN = {"qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3-vl-moe", "qwen3.5"}


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def fam(request, tiny_family_dir):  # noqa: F811 - the imported fixture
    path = tiny_family_dir(request.param)
    model, processor = load_model(str(path), device="cpu", dtype="float32")
    # two image sizes: different token counts (where the family resizes by aspect) and different prompt lengths
    images = [Image.new("RGB", (224, 224), (200, 30, 30)), Image.new("RGB", (160, 80), (30, 200, 30))]
    prompts = encode_prompts(processor, images, ["What colour is it?", "What shape is the object? (A) circle"])
    words = processor.tokenizer("The answer is A", add_special_tokens=False)["input_ids"]
    return SimpleNamespace(name=request.param, path=path, model=model, processor=processor, prompts=prompts,
                           words=words)


def test_families_are_recognised(fam):
    family = model_family(fam.model)
    assert family is not GENERIC
    assert (family.vision_once is not None) == (fam.name in QWEN)


def test_batched_scoring_equals_one_unpadded_forward_per_sequence(fam):
    """Right padding, two prompts of different sizes in one batch, per-token masks extended with text values and
    the vision tensors travelling with their sequence leave every response token's logits unchanged; where the
    family has the vision-once path, its hidden states equal the plain path's."""
    responses, owner = [fam.words[:3], fam.words[:1], fam.words], [0, 0, 1]
    family = model_family(fam.model)
    batch = build_sequences(fam.prompts, responses, owner, pad_id=fam.processor.tokenizer.pad_token_id or 0,
                            family=family)
    with torch.no_grad():
        plain = response_hidden(fam.model, batch, vision_once=False)
        got = lm_head(fam.model)(plain)
        want = []
        for r, p in zip(responses, owner, strict=True):
            prompt = fam.prompts[p]
            n = len(prompt)
            inputs = {k: torch.cat([v, torch.zeros(len(r), dtype=v.dtype)])[None] for k, v in prompt.tokens.items()}
            inputs["input_ids"][0, n:] = torch.tensor(r)
            inputs["attention_mask"][0, n:] = 1
            out = fam.model(**inputs, **prompt.vision, use_cache=False)
            want.append(out.logits[0, n - 1:n - 1 + len(r)])
        torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-4)
        if family.vision_once is not None:
            fast = response_hidden(fam.model, batch, vision_once=True)
            torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_one_processor_call_encodes_the_prompts_as_calls_of_their_own_do(fam, capsys):
    """Where the family says how to cut a batched call's vision tensors apart (Qwen), one processor call for
    prompts of different sizes gives every prompt exactly the tensors a call for it alone gives; elsewhere the
    prompts are encoded one call each, and that is said once."""
    images = [Image.new("RGB", (224, 224), (200, 30, 30)), Image.new("RGB", (160, 80), (30, 200, 30)),
              Image.new("RGB", (64, 96), (30, 30, 200))]
    texts = ["What colour is it?", "What shape is the object? (A) circle", "What colour is it?"]
    family = model_family(fam.model)
    calls = []
    call = type(fam.processor).__call__

    def counting(self, *a, **k):
        calls.append(1)
        return call(self, *a, **k)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(type(fam.processor), "__call__", counting)
        batched = encode_prompts(fam.processor, images, texts, family)
    own = [encode_prompts(fam.processor, [im], [t])[0] for im, t in zip(images, texts, strict=True)]
    assert len(calls) == (1 if family.split_vision is not None else 3)
    assert (family.split_vision is not None) == (fam.name in QWEN)
    for got, want in zip(batched, own, strict=True):
        assert got.tokens.keys() == want.tokens.keys() and got.vision.keys() == want.vision.keys()
        for key in want.tokens:
            assert torch.equal(got.tokens[key], want.tokens[key]), key
        for key in want.vision:
            assert torch.equal(got.vision[key], want.vision[key]), key
        assert got.text == want.text
    if family.split_vision is None:
        encode_prompts(fam.processor, images, texts, family)
        assert capsys.readouterr().err.count("one processor call per prompt") == 1


def test_rollouts_are_the_same_with_and_without_the_vision_once_path(fam, monkeypatch):
    """Qwen families: n rollouts sharing one vision-tower pass sample what the plain path (pixels repeated n
    times) samples under the same seed. Other families take the plain path both times."""
    engine = HFRolloutEngine(fam.model, fam.processor, prefix_sharing=False)  # the repeated-prompt path
    settings = SamplingSettings(n=3, max_new_tokens=4)
    torch.manual_seed(3)
    shared = engine.generate(fam.prompts, settings)
    monkeypatch.setattr("vopd_train.rollout._generate_accepts_encoder_outputs", lambda m: False)
    torch.manual_seed(3)
    plain = engine.generate(fam.prompts, settings)
    assert [r.token_ids for r in shared] == [r.token_ids for r in plain]
    assert [r.prompt_index for r in shared] == [0, 0, 0, 1, 1, 1]


def test_vision_tokens_are_derived_and_never_sampled(fam):
    """The banned ids hold every token the family's processor uses for images (the builder's own list, an
    independent source) and never an end-of-sequence id. Made by far the likeliest, none is ever sampled."""
    model, processor = load_model(str(fam.path), device="cpu", dtype="float32")
    tok = processor.tokenizer
    bad = vision_token_ids(processor, model.config)
    assert set(tok.convert_tokens_to_ids(list(tiny_vision_tokens(fam.name)))) <= set(bad)
    eos = model.generation_config.eos_token_id
    assert not set(eos if isinstance(eos, list) else [eos]) & set(bad)
    head = lm_head(model)
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie: only the output side moves
    with torch.no_grad():
        head.weight[bad] = 0.0
        head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
        head.bias[bad] = 50.0
    engine = HFRolloutEngine(model, processor)
    torch.manual_seed(0)
    rolls = engine.generate(fam.prompts, SamplingSettings(n=2, max_new_tokens=5))
    sampled = {t for r in rolls for t in r.token_ids}
    assert sampled and not sampled & set(bad)
    batch = build_sequences(fam.prompts, [r.token_ids for r in rolls], [r.prompt_index for r in rolls],
                            engine.pad_id, engine.family)
    with torch.no_grad():  # the bias really does make them the likeliest tokens
        assert set(head(response_hidden(model, batch)).argmax(-1).tolist()) <= set(bad)


def test_vllm_request_reencodes_to_the_trainers_prompt(fam):
    from vopd_train.rollout_vllm import vllm_request

    for prompt in fam.prompts:
        request = vllm_request(prompt)
        again = fam.processor(text=[request["prompt"]], images=[[request["multi_modal_data"]["image"]]],
                              return_tensors="pt")["input_ids"][0]
        assert again.tolist() == prompt.input_ids.tolist()


@pytest.fixture(scope="module")
def distilled(fam, tmp_path_factory):
    """`vopd distill` for 1 step, then the same command for 2 steps (a resume), as a user would run it."""
    from typer.testing import CliRunner

    from vopd_train.cli import app

    out = tmp_path_factory.mktemp(f"distill-{fam.name}")
    args = ["distill", str(fam.path), "--data", "synthetic:train", "--batch-size", "2", "--n-rollouts", "2",
            "--max-new-tokens", "4", "--no-remeasure", "--out", str(out), "--data-limit", "4", "--save-every", "1",
            "--threads", "1", "--quiet"]
    runs = [CliRunner().invoke(app, [*args, "--steps", str(steps)]) for steps in (1, 2)]
    return SimpleNamespace(out=out, runs=runs)


def test_distill_two_steps_with_resume(distilled):
    first, second = distilled.runs
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "resuming" in second.output
    log = [json.loads(line) for line in (distilled.out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2] and all(row["tokens"] > 0 for row in log)


def test_the_distilled_model_runs_a_batched_gap_report_without_errors(fam, distilled, tmp_path):
    """gap-report --limit 6 on the distilled model: it loads back, and every batch (one per view) goes through
    whole, with no per-sample error."""
    from vopd_bench.backends.hf import HFBackend
    from vopd_bench.runner import GapReportConfig, run_gap_report

    model_dir = distilled.out / "model"
    backend = HFBackend(str(model_dir), batch_size=6, threads=1)
    sizes = []
    inner = backend._generate_batch

    def counted(requests, gen):
        sizes.append(len(requests))
        return inner(requests, gen)

    backend._generate_batch = counted
    cfg = GapReportConfig(model=str(model_dir), benchmarks=["synthetic:test"], limit=6, batch_size=6,
                          max_new_tokens=4, out=str(tmp_path / "gap"), quiet=True)
    result = run_gap_report(cfg, backend=backend)
    assert len(result.records) == 18 and all(r.error is None for r in result.records)
    assert sizes == [6, 6, 6]  # one batch per view, never split
    assert json.loads((tmp_path / "gap" / "run.json").read_text())["batch_splits"] == 0
