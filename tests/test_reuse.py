"""The student's prefill reused for the rollouts (`vopd_train.reuse`) changes nothing but the work: the same
samples, the same per-token losses, the same gradients and the same weights after three steps as the plain step,
on tiny checkpoints of every family in `REUSE_MODEL_TYPES`, at one and at several rollouts per prompt."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_train_loop import tiny_cfg
from tiny_fixtures import tiny_family_dir  # noqa: F401

from vopd_bench.modeling import load_model
from vopd_train.reuse import REUSE_MODEL_TYPES, PrefillReuse
from vopd_train.rollout import (
    build_sequences,
    collate_left,
    encode_prompts,
    lm_head,
    model_family,
    response_hidden,
)
from vopd_train.trainer import Distiller

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


def _model_dir(family: str, tiny_model_dir, tiny_family_dir):  # noqa: F811
    return tiny_model_dir if family == "qwen2-vl" else tiny_family_dir(family)


def _run(model_dir, out, reuse: bool, **kw):
    """Three steps; records every step's samples and the student's gradients of the first update."""
    d = Distiller(tiny_cfg(model_dir, out, steps=3, max_new_tokens=6, lora=True, lora_rank=4, **kw))
    # EOS made likely enough that some responses stop early while others run on (right padding in the scoring)
    head = lm_head(d.model)
    head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]), requires_grad=False)
    eos = d.model.generation_config.eos_token_id
    with torch.no_grad():
        head.bias[eos if isinstance(eos, list) else [eos]] = 5.0
    if not reuse:
        d.reuse = d.engine.reuse = None
    samples, grads, used = [], [], []
    generate = d.engine.generate

    def recording(prompts, settings):
        rollouts = generate(prompts, settings)
        samples.append([r.token_ids for r in rollouts])
        used.append(d.reuse is not None and d.reuse.pending is not None)
        return rollouts

    d.engine.generate = recording
    step = d.optimizer.step

    def grab(*a, **k):
        grads.append({n: p.grad.clone() for n, p in d.model.named_parameters() if p.grad is not None})
        return step(*a, **k)

    d.optimizer.step = grab
    stats = [d.train_step(k) for k in range(3)]
    weights = {n: p.detach().clone() for n, p in d.model.named_parameters() if p.requires_grad}
    return samples, [s.divergence for s in stats], grads, weights, used


CASES = [(f, n, "ema") for f in FAMILIES for n in (1, 3)] + [("qwen2-vl", 1, "frozen"), ("qwen2-vl", 3, "frozen")]


@pytest.mark.parametrize("family,n,teacher", CASES)
def test_reused_prefill_samples_and_trains_like_the_plain_step(family, n, teacher, tiny_model_dir,
                                                               tiny_family_dir, tmp_path):  # noqa: F811
    """The EMA adapter teacher swaps its weights in, and the frozen one switches the adapter off, between the
    student's prefill and its backward: neither may disturb the gradients that reach the prefill."""
    model_dir = _model_dir(family, tiny_model_dir, tiny_family_dir)
    kw = dict(n_rollouts=n, batch_size=3, micro_batch_size=3 * n, teacher=teacher)
    on = _run(model_dir, tmp_path / "on", True, **kw)
    off = _run(model_dir, tmp_path / "off", False, **kw)
    samples_on, div_on, grads_on, w_on, used = on
    samples_off, div_off, grads_off, w_off, _ = off
    assert used == [True] * 3  # every step's rollouts came from the student's own prefill
    assert samples_on == samples_off and len(samples_on[0]) == 3 * n
    assert len({len(t) for step in samples_on for t in step}) > 1  # responses of different lengths
    torch.testing.assert_close(torch.tensor(div_on), torch.tensor(div_off), rtol=1e-4, atol=0)
    for g_on, g_off in zip(grads_on, grads_off, strict=True):
        assert g_on.keys() == g_off.keys() and len(g_on) > 0
        for name, want in g_off.items():
            _rel_close(g_on[name], want, 1e-3)  # float32 rounding (see the float64 test below)
    # AdamW divides every entry by its own running scale, so rounding in near-zero gradient entries moves the
    # weights by up to the learning rate there: the weights after three steps agree to 1e-3 of their norm
    for name, want in w_off.items():
        _rel_close(w_on[name], want, 1e-3)


def _rel_close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    """‖a − b‖ ≤ rel·‖b‖ over the whole tensor: float32 sums in another order move entries near 0 by more than
    any element-wise ratio could allow."""
    err, scale = float((a.double() - b.double()).norm()), float(b.double().norm())
    assert err <= rel * max(scale, 1e-12), (err, scale)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths,owner", [((5, 3, 7, 1, 4), [0, 0, 0, 1, 1]), ((4, 1), [0, 1])])
def test_reused_prefill_is_exact_in_float64(family, lengths, owner, tiny_model_dir, tiny_family_dir):  # noqa: F811
    """With float64 arithmetic the student's hidden states through the reused prefill equal the plain path's
    (one full forward per sequence) to 1e-12, for prompts of different lengths with different numbers of
    responses of different lengths: the float32 differences above are rounding, not a position, mask or cache
    error."""
    model, processor = load_model(str(_model_dir(family, tiny_model_dir, tiny_family_dir)), device="cpu",
                                  dtype="float32")
    model.double().train()
    images = [Image.new("RGB", (224, 224), (200, 30, 30)), Image.new("RGB", (120, 60), (30, 200, 30))]
    prompts = encode_prompts(processor, images, ["What colour is it?", "What shape is the red object? (A) circle"])
    for p in prompts:
        p.vision = {k: v.double() if v.is_floating_point() else v for k, v in p.vision.items()}
    assert len(prompts[0]) != len(prompts[1])
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(20, 300, (n,), generator=g).tolist() for n in lengths]
    family_entry = model_family(model)
    batch = build_sequences(prompts, responses, owner, 0, family_entry)
    reuse = PrefillReuse(model, 0, max_prompts=2)
    inputs = collate_left(prompts, 0, family_entry)
    assert reuse.why_not(prompts, inputs) is None
    reuse.prefill(prompts, inputs)
    reused = reuse.hidden(batch)
    assert reuse.pending is None and reused.requires_grad
    with torch.no_grad():
        plain = response_hidden(model, batch)
    assert reused.dtype == torch.float64 and reused.shape == plain.shape == (sum(lengths), model.config.text_config.hidden_size)
    torch.testing.assert_close(reused.detach(), plain, rtol=1e-12, atol=1e-12)


def test_several_micro_batches_run_the_plain_step(tiny_model_dir, tmp_path):
    """The prefill is reused only when the step's prompts fit one micro-batch (its activations are then the ones
    the student's forward keeps anyway); otherwise the rollouts prefill on their own, as before."""
    d = Distiller(tiny_cfg(tiny_model_dir, tmp_path / "run", n_rollouts=2, batch_size=2, micro_batch_size=2,
                           lora=True, lora_rank=4))
    assert isinstance(d.reuse, PrefillReuse) and d.reuse.max_prompts == 1
    prefills = []
    prefill = d.reuse.prefill
    d.reuse.prefill = lambda *a: prefills.append(1) or prefill(*a)
    d.train_step(0)
    assert prefills == []


def test_only_proven_models_in_one_process_reuse_their_prefill(tiny_model_dir, tiny_family_dir, tmp_path):  # noqa: F811
    assert REUSE_MODEL_TYPES == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}
    d = Distiller(tiny_cfg(tiny_family_dir("qwen3.5"), tmp_path / "q35", lora=True, lora_rank=4))
    assert "reused for rollouts only for" in d.reuse.why_not([], {})
    off = Distiller(tiny_cfg(tiny_model_dir, tmp_path / "off", prefix_sharing=False))
    assert off.reuse is None and off.engine.reuse is None
