"""Every distill option the README lists, run through `Distiller` on a tiny real Qwen2-VL, each with a check of
its effect computed independently of the trainer: hand-computed weights and learning rates, formulas applied to
the trainer's own intermediate tensors, and counts of what ran."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import vopd_train.trainer as trainer_module
from vopd_bench.benchmarks.synthetic import make_sample
from vopd_bench.modeling import load_model
from vopd_train.config import DistillConfig
from vopd_train.rollout import Rollout, build_sequences, encode_prompts, response_hidden
from vopd_train.trainer import Distiller

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = [40, 41, 42]
# FakeEngine's responses for batch_size 2 × n_rollouts 2, prompt-major: lengths 1, 2, 2, 3
LENGTHS = [1, 2, 2, 3]


class FakeEngine:
    """Fixed responses, the same whatever the weights, so two configurations see identical rollouts. Each token's
    rollout log-probability is -20, far below the model's own (about -6)."""

    def generate(self, prompts, settings):
        out = []
        for i in range(len(prompts)):
            for j in range(settings.n):
                n = 1 + (i + j) % len(TOKENS)
                out.append(Rollout(i, TOKENS[:n], [-20.0] * n))
        return out

    def sync_weights(self, model):
        pass


def cfg_for(model_dir, out, **kw) -> DistillConfig:
    base = dict(model=str(model_dir), data="synthetic:train", out=str(out), data_limit=6, steps=2, batch_size=2,
                n_rollouts=2, max_new_tokens=3, micro_batch_size=4, lr=1e-3, warmup_steps=0, topk=20, seed=0,
                weight_decay=0.0, remeasure=False, quiet=True, threads=1)
    base.update(kw)
    return DistillConfig(**base)


def grads(d: Distiller) -> dict[str, torch.Tensor]:
    """The (clipped) gradients the last step applied: the trainer zeroes them only at the next step."""
    return {n: p.grad.detach().clone() for n, p in d.model.named_parameters() if p.grad is not None}


def spy_divergence(monkeypatch) -> list[dict]:
    """Record every call of the trainer's chunked divergence: its inputs and its output."""
    calls: list[dict] = []
    real = trainer_module.chunked_divergence

    def spy(student_hidden, teacher_hidden, student_head, teacher_head, target_ids, **kw):
        with torch.no_grad():  # the logits as they are now: the heads change with the step's update
            zs, zt = student_head(student_hidden).float(), teacher_head(teacher_hidden).float()
        out = real(student_hidden, teacher_hidden, student_head, teacher_head, target_ids, **kw)
        calls.append({"zs": zs, "zt": zt, "ids": target_ids.clone(), "kw": kw, "out": out})
        return out

    monkeypatch.setattr(trainer_module, "chunked_divergence", spy)
    return calls


def spy_weights(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = trainer_module.token_weights

    def spy(lengths, mode="seq-mean"):
        w = real(lengths, mode)
        seen.append(w.clone())
        return w

    monkeypatch.setattr(trainer_module, "token_weights", spy)
    return seen


# --------------------------------------------------------------------------------------------------------------
# --gradient-checkpointing, --loss-chunk-size: same gradients, computed differently


def test_gradient_checkpointing_keeps_fewer_activations_and_the_same_gradients(tiny_model_dir, tmp_path):
    results = {}
    for on in (False, True):
        d = Distiller(cfg_for(tiny_model_dir, tmp_path / str(on), steps=1, gradient_checkpointing=on),
                      engine=FakeEngine())
        saved = [0]

        def pack(t, saved=saved):
            saved[0] += 1
            return t

        # every tensor autograd keeps for the backward pass goes through `pack`; checkpointed layers keep only
        # their inputs and recompute the rest
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            d.train_step(0)
        results[on] = (grads(d), saved[0])
    (plain, n_plain), (ckpt, n_ckpt) = results[False], results[True]
    assert n_ckpt < n_plain * 0.75, (n_ckpt, n_plain)
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-7, msg=name)


def test_loss_chunk_size_bounds_the_rows_per_projection_and_keeps_the_gradients(tiny_model_dir, tmp_path):
    results = {}
    for chunk in (1, 512):
        d = Distiller(cfg_for(tiny_model_dir, tmp_path / str(chunk), steps=1, loss_chunk_size=chunk),
                      engine=FakeEngine())
        rows: list[int] = []
        head = d.model.get_output_embeddings()
        head.register_forward_hook(lambda m, args, out, rows=rows: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
        d.train_step(0)
        results[chunk] = (grads(d), rows)
    (small, rows_small), (large, rows_large) = results[1], results[512]
    assert rows_small and max(rows_small) == 1
    assert max(rows_large) == sum(LENGTHS)  # one chunk holds every response token of the step
    for name in large:
        torch.testing.assert_close(small[name], large[name], rtol=1e-4, atol=1e-7, msg=name)


# --------------------------------------------------------------------------------------------------------------
# warm-up, gradient clip


def test_warmup_scales_the_first_updates_and_the_clip_bounds_the_gradient(tiny_model_dir, tmp_path):
    lr, warm, clip = 1e-3, 4, 1e-3
    d = Distiller(cfg_for(tiny_model_dir, tmp_path / "w", steps=3, warmup_steps=warm, lr=lr, grad_clip=clip),
                  engine=FakeEngine())
    for step in range(3):
        used = lr * min(1.0, (step + 1) / warm)  # linear warm-up: 1/4, 2/4, 3/4 of the rate
        assert d.optimizer.param_groups[0]["lr"] == pytest.approx(used)
        before = {n: p.detach().clone() for n, p in d.model.named_parameters()}
        stats = d.train_step(step)
        g = grads(d)
        # the clip: the step's gradient had a larger norm, the applied one has exactly the clip's
        assert stats.grad_norm > clip
        assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g.values()])).item() \
            == pytest.approx(clip, rel=1e-4)
        if step == 0:
            # AdamW's first update is lr·g/|g| per coordinate (no weight decay): the learning rate in force
            moves = torch.cat([(p.detach() - before[n]).abs()[g[n].abs() > 1e-5] for n, p in d.model.named_parameters()
                               if n in g])
            assert moves.numel() > 100
            assert moves.median().item() == pytest.approx(used, rel=1e-2)
            assert moves.max().item() <= used * (1 + 1e-3)


# --------------------------------------------------------------------------------------------------------------
# --restart, skipped.jsonl


def test_restart_discards_the_saved_state(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    Distiller(cfg_for(tiny_model_dir, out, steps=1, lr=1e-2), engine=FakeEngine()).train()
    assert (out / "state").is_dir() and len((out / "train_log.jsonl").read_text().splitlines()) == 1
    assert Distiller(cfg_for(tiny_model_dir, out, steps=2, lr=1e-2), engine=FakeEngine()).step == 1  # resumes

    start, _ = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    # other settings would refuse to resume; --restart starts over instead
    fresh = Distiller(cfg_for(tiny_model_dir, out, steps=2, lr=5e-3, restart=True), engine=FakeEngine())
    assert fresh.step == 0 and fresh.scheduler.last_epoch == 0
    assert not (out / "state").exists() and not (out / "train_log.jsonl").exists()
    assert not fresh.optimizer.state  # no AdamW moments carried over
    start_params = dict(start.named_parameters())
    for n, p in fresh.model.named_parameters():
        assert torch.equal(p, start_params[n]), n  # the starting weights, not the saved ones


def test_prompts_that_cannot_be_used_are_listed_in_skipped_jsonl(tiny_model_dir, tmp_path):
    rows = []
    for i in range(4):
        s = make_sample(i, "train")
        image = tmp_path / f"img{i}.png"
        s.image().save(image)
        rows.append({"id": f"q{i}", "image": str(image), "question": s.question, "options": list(s.options),
                     "bbox": list(s.boxes[0])})
    del rows[1]["bbox"]  # no evidence: the teacher has no crop
    rows[2]["image"] = str(tmp_path / "missing.png")  # found out when the prompt is rendered
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = Distiller(cfg_for(tiny_model_dir, tmp_path / "s", data=f"local:{data}", data_limit=None, steps=1,
                          batch_size=3, n_rollouts=1), engine=FakeEngine())
    assert sorted(p.id.rsplit("/", 1)[-1] for p in d.data.prompts) == ["q0", "q2", "q3"]
    result = d.train()
    skipped = {r["id"].rsplit("/", 1)[-1]: r["reason"] for r in map(json.loads, (result.out / "skipped.jsonl").read_text().splitlines())}
    assert skipped.keys() == {"q1", "q2"}
    assert "no evidence box" in skipped["q1"] and "missing.png" in skipped["q2"]
    assert result.history[0]["sequences"] == 2 and result.history[0]["skipped"] == 2


# --------------------------------------------------------------------------------------------------------------
# --lora-targets


def test_lora_targets_choose_the_adapted_layers_and_the_zero_adapter_moves(tiny_model_dir, tmp_path):
    d = Distiller(cfg_for(tiny_model_dir, tmp_path / "q", steps=1, lora=True, lora_rank=2,
                          lora_targets="q_proj,v_proj"), engine=FakeEngine())
    named = dict(d.model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    assert trainable and all("lora_" in n and (".q_proj." in n or ".v_proj." in n) for n in trainable)
    assert any(".q_proj." in n for n in trainable) and any(".v_proj." in n for n in trainable)
    b = [n for n in trainable if "lora_B" in n]
    assert b and all(torch.count_nonzero(named[n]) == 0 for n in b)  # LoRA's B starts at zero
    d.train_step(0)
    assert all(torch.count_nonzero(named[n]) > 0 for n in b)  # only a gradient can move it (no weight decay)

    every = Distiller(cfg_for(tiny_model_dir, tmp_path / "all", steps=1, lora=True, lora_rank=2), engine=FakeEngine())
    kinds = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in every.model.named_parameters() if p.requires_grad}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= kinds


# --------------------------------------------------------------------------------------------------------------
# --objective, --reduction, --is-clip


SEQ_MEAN = [1 / 4] + [1 / 8] * 4 + [1 / 12] * 3  # 1 / (|y_i| · N), N = 4 responses of lengths 1, 2, 2, 3
TOKEN_MEAN = [1 / 8] * 8  # 1 / Σ|y_i|


@pytest.mark.parametrize("objective, reduction, expected_weights", [
    ("logits", "seq-mean", SEQ_MEAN),
    ("logits", "token-mean", TOKEN_MEAN),
    ("sampled-token", "seq-mean", SEQ_MEAN),
])
def test_objective_and_reduction_define_the_step_loss(tiny_model_dir, tmp_path, monkeypatch, objective, reduction,
                                                      expected_weights):
    calls, weights = spy_divergence(monkeypatch), spy_weights(monkeypatch)
    d = Distiller(cfg_for(tiny_model_dir, tmp_path / "o", steps=1, objective=objective, reduction=reduction,
                          topk=0), engine=FakeEngine())
    stats = d.train_step(0)
    [w] = weights
    torch.testing.assert_close(w, torch.tensor(expected_weights))
    [call] = calls  # one micro-batch holds the step's 4 responses
    out = call["out"]
    zs, zt = call["zs"], call["zt"]
    log_s, log_t = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    ids = call["ids"][:, None]
    s_tok, t_tok = log_s.gather(-1, ids)[:, 0], log_t.gather(-1, ids)[:, 0]
    torch.testing.assert_close(out.student_logp, s_tok, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.teacher_logp, t_tok, rtol=1e-5, atol=1e-5)
    if objective == "logits":
        # the full-vocabulary JSD (topk 0), written out: ½KL(S‖M) + ½KL(T‖M), M = ½(S + T)
        p, q = log_s.exp(), log_t.exp()
        m = (p + q) / 2
        jsd = 0.5 * (p * (log_s - m.log())).sum(-1) + 0.5 * (q * (log_t - m.log())).sum(-1)
        per_token = jsd
    else:
        # the policy-gradient surrogate: its value is (log p_S − log p_T)·log p_S, the divergence log p_S − log p_T
        torch.testing.assert_close(out.loss.detach(), (s_tok - t_tok) * s_tok, rtol=1e-5, atol=1e-5)
        per_token = s_tok - t_tok
    if objective == "logits":
        torch.testing.assert_close(out.loss.detach(), jsd, rtol=1e-4, atol=1e-6)
    expected = float((per_token * torch.tensor(expected_weights)).sum())
    assert stats.divergence == pytest.approx(expected, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("clip", [1.5, 3.0])
def test_is_clip_caps_the_importance_weight(tiny_model_dir, tmp_path, clip):
    # The engine's log-probs (-20) are far below the model's: every weight exp(log p − (−20)) is capped.
    d = Distiller(cfg_for(tiny_model_dir, tmp_path / "i", steps=1, importance_weight=True, is_clip=clip),
                  engine=FakeEngine())
    assert d.train_step(0).is_weight == pytest.approx(clip)


# --------------------------------------------------------------------------------------------------------------
# teachers: trust-region and current


def _teacher_batch(d: Distiller, responses: list[list[int]]):
    r = d.data.prompts[0].render()
    enc = encode_prompts(d.processor, [r.teacher_image], [r.text])
    return build_sequences(enc, responses, [0] * len(responses), d.pad_id)


def test_trust_region_teacher_logits_lie_between_the_frozen_teachers_and_the_students(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    rate = 0.3
    d = Distiller(cfg_for(tiny_model_dir, tmp_path / "t", steps=2, lr=1e-2, teacher="trust-region",
                          teacher_rate=rate, topk=0), engine=FakeEngine())
    d.train_step(0)  # the student moves away from the start
    calls = spy_divergence(monkeypatch)
    d.train_step(1)
    [call] = calls
    base, _ = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    zs, z_frozen = call["zs"], call["zt"]
    with torch.no_grad():  # the teacher's hidden states are the starting model's, on the crop
        batch = _teacher_batch(d, [TOKENS[:1]])
        torch.testing.assert_close(d.teacher.hidden(batch), response_hidden(base, batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(zs, z_frozen, atol=1e-3)  # so "between" is a real interval
    z_tr = (1 - rate) * z_frozen + rate * zs
    lo, hi = torch.minimum(z_frozen, zs), torch.maximum(z_frozen, zs)
    assert bool(((z_tr >= lo - 1e-6) & (z_tr <= hi + 1e-6)).all())
    ids = call["ids"][:, None]
    used = call["out"].teacher_logp
    torch.testing.assert_close(used, F.log_softmax(z_tr, -1).gather(-1, ids)[:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(used, F.log_softmax(z_frozen, -1).gather(-1, ids)[:, 0], atol=1e-4)


def test_current_teacher_is_the_live_student_on_the_crop(tiny_model_dir, tmp_path):
    d = Distiller(cfg_for(tiny_model_dir, tmp_path / "c", steps=2, lr=1e-2, teacher="current"), engine=FakeEngine())
    batch = _teacher_batch(d, [TOKENS])
    with torch.no_grad():
        start = response_hidden(d.model, batch)
    d.train_step(0)
    with torch.no_grad():
        live = response_hidden(d.model, batch)
        torch.testing.assert_close(d.teacher.hidden(batch), live, rtol=0, atol=0)
    assert not torch.allclose(live, start, atol=1e-5)  # it moved with the student, no lag
