"""Rollouts and the sequences both models score, on a tiny real Qwen2-VL (toy-world pitfalls 3, 5, 7, 8)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vopd_bench.modeling import load_model, vision_token_ids
from vopd_train.rollout import (
    HFRolloutEngine,
    SamplingSettings,
    build_sequences,
    encode_prompts,
    lm_head,
    response_hidden,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, processor = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    return model, processor


@pytest.fixture(scope="module")
def prompts(tiny):
    _, processor = tiny
    # different image sizes give different token counts, so the prompts have different lengths
    images = [Image.new("RGB", (224, 224), (200, 30, 30)), Image.new("RGB", (120, 60), (30, 200, 30))]
    return encode_prompts(processor, images, ["What colour is it?", "What shape is the red object? (A) circle"])


def test_encoded_prompts_are_unpadded_and_own_their_pixels(tiny, prompts):
    _, processor = tiny
    assert len(prompts[0].input_ids) != len(prompts[1].input_ids)
    pad = processor.tokenizer.pad_token_id
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for p in prompts:
        assert p.input_ids[0].item() != pad
        n_image_tokens = int((p.input_ids == image_id).sum())
        grid = p.vision["image_grid_thw"]
        assert n_image_tokens == int(grid.prod()) // 4  # merge 2×2
        assert p.vision["pixel_values"].shape[0] == int(grid.prod())
        assert torch.equal(p.tokens["mm_token_type_ids"].bool(), p.input_ids == image_id)
        assert p.tokens["attention_mask"].tolist() == [1] * len(p)


def test_build_sequences_layout(prompts):
    responses = [[5, 6, 7], [8], [9, 10]]
    owner = [0, 0, 1]
    b = build_sequences(prompts, responses, owner, pad_id=0)
    n0, n1 = len(prompts[0].input_ids), len(prompts[1].input_ids)
    assert b.input_ids.shape == (3, max(n0 + 3, n1 + 2))
    assert b.input_ids[0, n0:n0 + 3].tolist() == [5, 6, 7]
    assert b.attention_mask.sum(1).tolist() == [n0 + 3, n0 + 1, n1 + 2]
    # mm_token_type_ids: the prompt's, then zeros over the response (pitfall 3)
    mm = b.tokens["mm_token_type_ids"]
    assert torch.equal(mm[2, :n1], prompts[1].tokens["mm_token_type_ids"])
    for k, n in enumerate((n0, n0, n1)):
        assert mm[k, n:].sum() == 0
    assert mm[0, :n0].sum() > 0
    # position k predicts response token k: the one right before it
    assert b.rows.tolist() == [0, 0, 0, 1, 2, 2]
    assert b.pos.tolist() == [n0 - 1, n0, n0 + 1, n0 - 1, n1 - 1, n1]
    assert b.targets.tolist() == [5, 6, 7, 8, 9, 10]
    assert b.lengths.tolist() == [3, 1, 2]
    assert len(b.prompt_vision) == 2 and b.seq_prompt == [0, 0, 1]
    assert torch.equal(b.vision()["image_grid_thw"], torch.cat([prompts[i].vision["image_grid_thw"] for i in owner]))


def test_batched_scoring_equals_one_unpadded_forward_per_sequence(tiny, prompts):
    """Right padding, mixed image sizes, vision features shared across rollouts, and rope positions recomputed
    after a generate() call (pitfall 5) all leave the logits of every response token unchanged."""
    model, processor = tiny
    engine = HFRolloutEngine(model, processor)
    torch.manual_seed(0)
    rolls = engine.generate(prompts, SamplingSettings(n=2, max_new_tokens=4))  # leaves rope_deltas behind
    assert [r.prompt_index for r in rolls] == [0, 0, 1, 1]
    batch = build_sequences(prompts, [r.token_ids for r in rolls], [r.prompt_index for r in rolls], engine.pad_id)
    with torch.no_grad():
        got = lm_head(model)(response_hidden(model, batch, vision_once=True))
        got_separate = lm_head(model)(response_hidden(model, batch, vision_once=False))
        want = []
        for r in rolls:
            p = prompts[r.prompt_index]
            ids = torch.cat([p.input_ids, torch.tensor(r.token_ids)])[None]
            mm = torch.cat([p.tokens["mm_token_type_ids"], torch.zeros(len(r.token_ids), dtype=torch.long)])[None]
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                        pixel_values=p.vision["pixel_values"], image_grid_thw=p.vision["image_grid_thw"],
                        use_cache=False)
            n = len(p.input_ids)
            want.append(out.logits[0, n - 1:n - 1 + len(r.token_ids)])
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, got_separate, rtol=1e-5, atol=1e-5)


def test_vision_tokens_are_never_sampled(tiny_model_dir, prompts):
    """Make the vision special tokens by far the likeliest: without suppression they would fill the rollout."""
    model, processor = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    bad = vision_token_ids(processor, model.config)
    head = lm_head(model)
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie so that only the output side moves
    with torch.no_grad():
        head.weight[bad] = 0.0
        head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
        head.bias[bad] = 50.0
    engine = HFRolloutEngine(model, processor)
    torch.manual_seed(0)
    rolls = engine.generate(prompts, SamplingSettings(n=3, max_new_tokens=8))
    tokens = [t for r in rolls for t in r.token_ids]
    assert len(tokens) > 0 and not set(tokens) & set(bad)
    with torch.no_grad():  # the bias really does make them the most likely tokens
        b = build_sequences(prompts, [r.token_ids for r in rolls], [r.prompt_index for r in rolls], engine.pad_id)
        top = head(response_hidden(model, b)).argmax(-1)
    assert set(top.tolist()) <= set(bad)


def test_responses_are_cut_after_their_first_eos(tiny):
    model, processor = tiny
    engine = HFRolloutEngine(model, processor)
    eos = next(iter(engine.eos_ids))
    pad = engine.pad_id
    assert engine._trim([4, 5, eos, pad, pad]) == [4, 5, eos]
    assert engine._trim([eos, 7, 8]) == [eos]
    assert engine._trim([4, 5, 6]) == [4, 5, 6]  # hit max_new_tokens: kept whole, no EOS


def test_shared_image_features_sample_the_same_rollouts(tiny, prompts, monkeypatch):
    """n rollouts of a prompt share one pass of its image through the vision tower; the samples are those of
    the plain path that repeats the pixels n times."""
    model, processor = tiny
    engine = HFRolloutEngine(model, processor, prefix_sharing=False)  # the repeated-prompt path
    settings = SamplingSettings(n=3, max_new_tokens=5)
    torch.manual_seed(7)
    shared = engine.generate(prompts, settings)
    monkeypatch.setattr("vopd_train.rollout._generate_accepts_encoder_outputs", lambda m: False)
    torch.manual_seed(7)
    plain = engine.generate(prompts, settings)
    assert [r.token_ids for r in shared] == [r.token_ids for r in plain]
    assert len({tuple(r.token_ids) for r in shared}) > 1  # and they are samples, not one repeated answer


def test_a_model_whose_forward_fails_says_why_in_one_line(tiny, prompts, monkeypatch):
    """A model outside the standard API fails the run with one line naming it, never a traceback."""
    from vopd_bench.errors import VopdError
    from vopd_train.rollout import backbone

    model, _ = tiny
    batch = build_sequences(prompts, [[40, 41]], [0], pad_id=0)

    def refuses(*args, **kwargs):
        raise TypeError("forward() got an unexpected keyword argument 'mm_token_type_ids'\nTraceback: ...")

    monkeypatch.setattr(backbone(model), "forward", refuses)
    with pytest.raises(VopdError) as err:
        response_hidden(model, batch)
    assert str(err.value) == ("qwen2_vl models cannot score sequences in vopd distill (TypeError: forward() got an "
                              "unexpected keyword argument 'mm_token_type_ids')")


def test_a_processor_that_fails_says_why_in_one_line():
    from vopd_bench.errors import VopdError

    class Broken:
        def apply_chat_template(self, *args, **kwargs):
            return "<image> hi"

        def __call__(self, **kwargs):
            raise KeyError("images")

    with pytest.raises(VopdError, match=r"^Broken cannot encode its prompts in vopd distill \(KeyError: 'images'\)$"):
        encode_prompts(Broken(), [Image.new("RGB", (8, 8))], ["hi"])
