"""Rollouts that prefill each prompt once (`vopd_train.prefill`) sample exactly what the plain path (every prompt
repeated n times) samples: the same logits at every step and the same tokens, row for row, on tiny checkpoints of
every family in `SHARED_MODEL_TYPES`, with left padding and rows that stop early; and the prefill really runs on
one row per prompt."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_fixtures import tiny_family_dir  # noqa: F401

from vopd_bench.modeling import load_model
from vopd_train.prefill import SHARED_MODEL_TYPES, why_not_prefilled_once
from vopd_train.rollout import HFRolloutEngine, SamplingSettings, encode_prompts, lm_head
from vopd_train.sampling import GumbelMaxSampler

pytestmark = pytest.mark.usefixtures("one_thread")

N = 3
MAX_NEW = 10
SETTINGS = SamplingSettings(n=N, max_new_tokens=MAX_NEW, prompt_seeds=(11, 22, 33))


def _setup(family: str, tiny_model_dir, tiny_family_dir):  # noqa: F811
    path = tiny_model_dir if family == "qwen2-vl" else tiny_family_dir(family)
    model, processor = load_model(str(path), device="cpu", dtype="float32")
    # EOS made likely enough (≈1 in 8 per step) that some rows stop early while others run on, padded after it
    head = lm_head(model)
    head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        head.bias[eos if isinstance(eos, list) else [eos]] = 4.0
    images = [Image.new("RGB", (224, 224), (200, 30, 30)), Image.new("RGB", (120, 60), (30, 200, 30)),
              Image.new("RGB", (64, 96), (30, 30, 200))]
    prompts = encode_prompts(processor, images, ["What colour is it?", "What shape is the red object? (A) circle",
                                                 "Hi"])
    return model, processor, prompts


def _sample(model, processor, prompts, share: bool, monkeypatch):
    """The rollouts, the scores every decoding step saw (before the Gumbel noise), and the shape of each
    language-model forward."""
    scores: list[torch.Tensor] = []
    shapes: list[tuple[int, ...]] = []
    sampler_call = GumbelMaxSampler.__call__

    def recording_sampler(self, input_ids, step_scores):
        scores.append(step_scores.clone())
        return sampler_call(self, input_ids, step_scores)

    lm = model.model.language_model
    lm_forward = lm.forward

    def recording_forward(*args, **kwargs):
        shapes.append(tuple(kwargs["inputs_embeds"].shape[:2]))
        return lm_forward(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(GumbelMaxSampler, "__call__", recording_sampler)
        m.setattr(lm, "forward", recording_forward)
        rollouts = HFRolloutEngine(model, processor, prefix_sharing=share).generate(prompts, SETTINGS)
    return rollouts, torch.stack(scores), shapes


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5"])
def test_prefill_once_samples_what_the_plain_path_samples(family, tiny_model_dir, tiny_family_dir, monkeypatch):  # noqa: F811
    model, processor, prompts = _setup(family, tiny_model_dir, tiny_family_dir)
    assert model.config.model_type in SHARED_MODEL_TYPES
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == 3  # left padding differs per prompt

    on, on_scores, on_shapes = _sample(model, processor, prompts, True, monkeypatch)
    off, off_scores, off_shapes = _sample(model, processor, prompts, False, monkeypatch)

    assert [r.prompt_index for r in on] == [r.prompt_index for r in off] == [i // N for i in range(N * 3)]
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    torch.testing.assert_close(on_scores, off_scores, rtol=1e-5, atol=1e-5)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    stopped = [len(r.token_ids) for r in on if r.token_ids[-1] in eos]
    assert stopped and min(stopped) < MAX_NEW  # a row stopped early, and decoding went on for the others
    assert max(len(r.token_ids) for r in on) > min(stopped)
    for i in range(3):  # samples, not one answer repeated
        assert len({tuple(r.token_ids) for r in on if r.prompt_index == i}) > 1

    # the plain path prefills n·P rows of the full width; sharing prefills P rows one token short of it (the last
    # prompt token runs, per row, as the first decoding step), then every step decodes one token for n·P rows
    width = max(lengths)
    assert off_shapes[0] == (N * 3, width)
    assert on_shapes[0] == (3, width - 1)
    assert set(on_shapes[1:]) == set(off_shapes[1:]) == {(N * 3, 1)}


def test_an_unproven_family_samples_the_plain_way_and_says_so_once(tiny_family_dir, capsys):  # noqa: F811
    model, processor = load_model(str(tiny_family_dir("gemma3")), device="cpu", dtype="float32")
    prompts = encode_prompts(processor, [Image.new("RGB", (64, 64), (200, 30, 30))], ["What colour is it?"])
    settings = SamplingSettings(n=2, max_new_tokens=3, prompt_seeds=(5,))
    on = [HFRolloutEngine(model, processor, prefix_sharing=True).generate(prompts, settings) for _ in range(2)]
    off = HFRolloutEngine(model, processor, prefix_sharing=False).generate(prompts, settings)
    assert [r.token_ids for r in on[0]] == [r.token_ids for r in on[1]] == [r.token_ids for r in off]
    err = capsys.readouterr().err
    assert err.count("rollouts share a prompt's prefill only for") == 1 and "gemma3" in err


def test_three_distill_steps_sample_and_train_alike_with_and_without_sharing(tiny_model_dir, tmp_path):
    """The trainer's own HF rollouts under `--prefix-sharing` and `--no-prefix-sharing` (which covers the
    rollouts too): the same samples every step, the same divergences, the same weights after three updates."""
    from test_train_loop import tiny_cfg

    from vopd_train.trainer import Distiller

    runs = {}
    for share in (True, False):
        cfg = tiny_cfg(tiny_model_dir, tmp_path / f"run-{share}", steps=3, n_rollouts=4, max_new_tokens=6,
                       lora=True, lora_rank=4, prefix_sharing=share)
        d = Distiller(cfg)
        assert d.engine.prefix_sharing is share
        samples: list[list[int]] = []
        generate = d.engine.generate

        def recording(prompts, settings, generate=generate, samples=samples):
            rollouts = generate(prompts, settings)
            samples.extend(r.token_ids for r in rollouts)
            return rollouts

        d.engine.generate = recording
        logs = [d.train_step(k) for k in range(3)]
        runs[share] = (samples, [s.divergence for s in logs],
                       {n: p.detach().clone() for n, p in d.model.named_parameters() if p.requires_grad})
    (samples_on, div_on, w_on), (samples_off, div_off, w_off) = runs[True], runs[False]
    assert len(samples_on) == 3 * 2 * 4 and samples_on == samples_off
    torch.testing.assert_close(torch.tensor(div_on), torch.tensor(div_off), rtol=1e-4, atol=0)
    assert set(w_on) == set(w_off)
    for name, want in w_off.items():
        torch.testing.assert_close(w_on[name], want, rtol=1e-4, atol=1e-4)


def test_which_inputs_can_share_their_prefill():
    ok = {"mm_token_type_ids": torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]])}
    assert why_not_prefilled_once("qwen2_5_vl", ok) is None
    assert "not gemma3" in why_not_prefilled_once("gemma3", ok)
    no_image = {"mm_token_type_ids": torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])}
    assert "has no image" in why_not_prefilled_once("qwen2_vl", no_image)
    assert "has no image" in why_not_prefilled_once("qwen2_vl", {})
    ends_in_image = {"mm_token_type_ids": torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])}
    assert "does not end with a text token" in why_not_prefilled_once("qwen3_5", ends_in_image)
