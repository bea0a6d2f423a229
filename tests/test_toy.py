"""The shipped toy VLM: loads offline from the package, generates a bare letter, its processor round-trips, and
the numbers its build recorded agree with each other and with the model card. Its accuracies measured through the
product, `vopd gap-report toy`, are checked by `test_toy_golden.py`."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from vopd_bench.benchmarks.synthetic import make_samples, synthetic_spec
from vopd_bench.modeling import TOY_DIR, encode, load_model
from vopd_bench.toy import TOY_WORLD
from vopd_bench.toy.build import BUILD_INFO, SLICE
from vopd_bench.toy.data import view_example
from vopd_bench.toy.evaluate import greedy_responses

VIEWS = ("full", "crop", "box")


@pytest.fixture(scope="module")
def toy():
    return load_model("toy")


@pytest.fixture(scope="module")
def info():
    return json.loads((TOY_DIR / BUILD_INFO).read_text())


def test_loads_offline_from_the_package_as_a_small_qwen2_vl(toy):
    model, processor = toy
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert 500_000 <= sum(p.numel() for p in model.parameters()) <= 3_000_000
    assert (TOY_DIR / "model.safetensors").is_file()
    assert not any(TOY_DIR.glob("*.bin")) and not any(TOY_DIR.glob("*.pt"))
    assert processor.tokenizer.padding_side == "left"


def test_greedy_generation_is_a_bare_letter(toy):
    model, processor = toy
    spec = synthetic_spec(None)
    samples = make_samples("test", TOY_WORLD, n=8)
    responses = greedy_responses(model, processor, [view_example(s, "crop", spec) for s in samples])
    assert all(re.fullmatch(r"[A-G]", r) for r in responses), responses


def test_tokenizer_round_trips_a_prompt(toy):
    _, processor = toy
    s = make_samples("test", TOY_WORLD, n=1)[0]
    prompt = synthetic_spec(None).render_prompt(s.question, s.options)
    ids = processor.tokenizer.encode(prompt, add_special_tokens=False)
    assert processor.tokenizer.decode(ids) == prompt
    # Every word of the synthetic vocabulary is one token, so option words can be matched against the image.
    for word in (*s.options, s.metadata["target_shape"]):
        assert len(processor.tokenizer.encode(" " + word, add_special_tokens=False)) == 1


def test_processor_save_and_load_give_identical_inputs(toy, tmp_path):
    from transformers import AutoProcessor

    _, processor = toy
    spec = synthetic_spec(None)
    examples = [view_example(s, v, spec) for s, v in zip(make_samples("test", TOY_WORLD, n=2), ("full", "crop"),
                                                          strict=True)]
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    again.tokenizer.padding_side = "left"
    a = encode(processor, [e.image for e in examples], [e.prompt for e in examples])
    b = encode(again, [e.image for e in examples], [e.prompt for e in examples])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # One image: 64 merged patches for a 224x224 canvas, each an <|image_pad|> token in the text.
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((a["input_ids"][0] == pad).sum()) == int(a["image_grid_thw"][0].prod()) // 4


def test_recorded_accuracies_meet_the_targets_and_agree_with_the_slice(info):
    test, sl = info["accuracy_test"], info["accuracy_slice"]
    assert test["n"] == 504
    assert test["crop"] >= 0.85
    assert test["crop"] - test["full"] >= 0.25
    for view in VIEWS:
        # The slice is a sample of the test split: its accuracy lies within ~3 binomial standard errors.
        p = test[view]
        assert abs(sl[view] - p) <= 3 * math.sqrt(max(p * (1 - p), 0.02) / SLICE) + 1 / SLICE, view


def test_model_card_states_the_recorded_numbers(info):
    card = (TOY_DIR.parent / "MODEL_CARD.md").read_text()
    for view in VIEWS:
        assert f"{info['accuracy_test'][view]:.3f}" in card, view
    assert info["command"].split(" --out")[0] in card


def test_training_inputs_are_the_backend_inputs_plus_the_answer_letter(toy):
    from vopd_bench.toy.data import encode_with_answers

    _, processor = toy
    spec = synthetic_spec("train")
    samples = make_samples("train", TOY_WORLD, n=3)
    examples = [view_example(s, "crop", spec) for s in samples]
    plain = encode(processor, [e.image for e in examples], [e.prompt for e in examples])
    inputs, targets = encode_with_answers(processor, examples)
    tok = processor.tokenizer
    letters = [tok.convert_tokens_to_ids(s.answer) for s in samples]
    assert torch.equal(inputs["input_ids"][:, :-1], plain["input_ids"])
    assert torch.equal(inputs["pixel_values"], plain["pixel_values"])
    assert inputs["input_ids"][:, -1].tolist() == letters
    assert targets[:, 0].tolist() == letters
    assert targets[:, 1].tolist() == [tok.convert_tokens_to_ids("<|im_end|>")] * 3
    assert inputs["attention_mask"][:, -1].tolist() == [1, 1, 1]
    assert inputs["mm_token_type_ids"][:, -1].tolist() == [0, 0, 0]


def test_batch_plan_keeps_one_image_grid_per_batch_and_the_view_mix():
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from vopd_bench.toy.data import batch_plan

    samples = make_samples("train", TOY_WORLD, n=400)
    spec = synthetic_spec("train")
    plan = batch_plan(samples, steps=30, batch_size=16, full_fraction=0.25, seed=0, canvas=224,
                      image_pixels=224 * 224)
    assert len(plan) == 30 and all(len(b) == 16 for b in plan)
    assert plan == batch_plan(samples, 30, 16, 0.25, 0, 224, 224 * 224)  # a fixed order for a seed
    batch_grids = []
    for batch in plan:
        # Independently: render each view and ask the processor's resize rule what grid it gets.
        grids = set()
        for i, view in batch:
            img: Image.Image = view_example(samples[i], view, spec).image
            grids.add(smart_resize(img.height, img.width, 28, 224 * 224, 224 * 224))
        assert len(grids) == 1, grids
        batch_grids += grids
    assert len(set(batch_grids)) >= 2  # crops do come in several grids, so the grouping matters
    views = [v for b in plan for _, v in b]
    assert set(views) == {"full", "crop"}
    assert 0.15 < views.count("full") / len(views) < 0.35
    assert {v for b in batch_plan(samples, 5, 16, 0.0, 0, 224, 224 * 224) for _, v in b} == {"crop"}
