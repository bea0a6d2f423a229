"""The training loop on a tiny real Qwen2-VL: rollout plumbing, teachers, resume after SIGKILL, label
independence, LoRA, and reloading the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vopd_bench.benchmarks.synthetic import make_sample
from vopd_train.config import DistillConfig
from vopd_train.rollout import Rollout
from vopd_train.trainer import Distiller

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(model_dir, out, **kw) -> DistillConfig:
    base = dict(model=str(model_dir), data="synthetic:train", out=str(out), data_limit=6, steps=2, batch_size=2,
                n_rollouts=2, max_new_tokens=3, micro_batch_size=4, lr=1e-3, warmup_steps=0, topk=20, seed=0,
                remeasure=False, quiet=True, threads=1)
    base.update(kw)
    return DistillConfig(**base)


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


class FakeEngine:
    """A stand-in for vLLM: fixed responses, with their rollout log-probs, and a record of weight syncs."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.syncs, self.calls = tokens, 0, []

    def generate(self, prompts, settings):
        self.calls.append((len(prompts), settings))
        return [Rollout(i, self.tokens[: 1 + (i + j) % len(self.tokens)], [-20.0] * (1 + (i + j) % len(self.tokens)))
                for i in range(len(prompts)) for j in range(settings.n)]

    def sync_weights(self, model):
        self.syncs += 1


def test_fake_engine_rollouts_and_ema_teacher(tiny_model_dir, tmp_path):
    engine = FakeEngine([40, 41, 42])
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "run", steps=1, teacher="ema", teacher_rate=0.05,
                   importance_weight=True)
    d = Distiller(cfg, engine=engine)
    before = {n: p.detach().clone() for n, p in d.model.named_parameters()}
    stats = d.train_step(0)
    assert engine.calls[0][0] == 2 and engine.calls[0][1].n == 2 and engine.syncs == 1
    # responses of length 1, 2, 2, 3 (prompt-major): 8 tokens
    assert stats.tokens == 8 and stats.sequences == 4 and stats.resp_len == 2.0
    # the engine's log-probs (-20) are far below the model's (about -6): every importance weight is clipped at 2
    assert stats.is_weight == pytest.approx(2.0)
    assert stats.grad_norm > 0 and 0 <= stats.agree <= 1
    teacher = dict(d.teacher.model.named_parameters())
    moved = 0
    for n, p in d.model.named_parameters():
        torch.testing.assert_close(teacher[n], 0.95 * before[n] + 0.05 * p.detach(), rtol=0, atol=1e-6)
        moved += not torch.equal(p, before[n])
    assert moved > 0


def test_frozen_teacher_keeps_the_starting_weights_and_current_is_the_student(tiny_model_dir, tmp_path):
    d = Distiller(tiny_cfg(tiny_model_dir, tmp_path / "f", steps=1, teacher="frozen"), engine=FakeEngine([40, 41]))
    start = {n: p.detach().clone() for n, p in d.model.named_parameters()}
    d.train_step(0)
    for n, p in d.teacher.model.named_parameters():
        assert torch.equal(p, start[n])
    c = Distiller(tiny_cfg(tiny_model_dir, tmp_path / "c", steps=1, teacher="current"), engine=FakeEngine([40]))
    assert c.teacher._model() is c.model


def test_reused_rollouts_are_weighted_against_the_policy_that_drew_them(tiny_model_dir, tmp_path):
    d = Distiller(tiny_cfg(tiny_model_dir, tmp_path / "r", steps=1, updates_per_batch=2, importance_weight=True,
                           lr=1e-2, teacher="frozen"))
    stats = d.train_step(0)
    assert d.scheduler.last_epoch == 2  # two optimizer updates on one batch of rollouts
    # the first update is on-policy (weight exactly 1); the second sees the moved policy: the mean departs from 1
    assert stats.is_weight != pytest.approx(1.0, abs=1e-6) and 0.5 < stats.is_weight < 1.5


RUN_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from vopd_train.config import DistillConfig
    from vopd_train.trainer import Distiller
    kill_at = int(sys.argv[2])
    def on_step(s):
        if s.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    cfg = DistillConfig(model=sys.argv[3], data="synthetic:train", out=sys.argv[1], data_limit=6, steps=4,
                        batch_size=2, n_rollouts=2, max_new_tokens=3, micro_batch_size=4, lr=1e-3, warmup_steps=2,
                        topk=20, teacher="ema", save_every=2, remeasure=False, quiet=True, threads=1)
    Distiller(cfg, on_step=on_step).train()
""")


def resume_cfg(model_dir, out, **kw) -> DistillConfig:
    """The settings of RUN_SCRIPT."""
    settings = dict(data_limit=6, steps=4, batch_size=2, n_rollouts=2, max_new_tokens=3, micro_batch_size=4, lr=1e-3,
                    warmup_steps=2, topk=20, teacher="ema", save_every=2)
    return tiny_cfg(model_dir, out, **{**settings, **kw})


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = model_tensors(a_dir), model_tensors(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkilled_and_resumed_run_ends_with_the_same_weights(tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(out: Path, kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", RUN_SCRIPT, str(out), str(kill_at), str(tiny_model_dir)],
                              env=env, capture_output=True, text=True, timeout=300)

    killed = run(tmp_path / "killed", kill_at=3)
    assert killed.returncode == -9, killed.stderr[-2000:]  # died in step 3, after the state saved at step 2
    state = json.loads((tmp_path / "killed" / "state" / "trainer_state.json").read_text())
    assert state["step"] == 2 and not (tmp_path / "killed" / "model").exists()
    # the same settings resume, here in this process (the killed one was a process of its own, as it must be)
    assert Distiller(resume_cfg(tiny_model_dir, tmp_path / "killed")).train().model_dir.is_dir()

    Distiller(resume_cfg(tiny_model_dir, tmp_path / "straight")).train()  # one thread, like the subprocess
    assert_same_weights(tmp_path / "straight" / "model", tmp_path / "killed" / "model")
    # the EMA teacher was restored too, and the log holds each step once
    ta, tb = (load_file(p / "state" / "teacher.safetensors") for p in (tmp_path / "straight", tmp_path / "killed"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_lora_ema_run_resumes_exactly(tiny_model_dir, tmp_path):
    """Stopped after its state at step 2 (a shorter --steps), then continued: same adapter, same EMA adapter."""
    Distiller(resume_cfg(tiny_model_dir, tmp_path / "parts", lora=True, lora_rank=4, steps=2)).train()
    second = Distiller(resume_cfg(tiny_model_dir, tmp_path / "parts", lora=True, lora_rank=4))
    assert second.step == 2
    second.train()
    Distiller(resume_cfg(tiny_model_dir, tmp_path / "straight", lora=True, lora_rank=4)).train()
    assert_same_weights(tmp_path / "straight" / "model", tmp_path / "parts" / "model")
    ta, tb = (load_file(tmp_path / p / "state" / "teacher.safetensors") for p in ("straight", "parts"))
    assert ta.keys() == tb.keys() and all("lora_" in k for k in ta) and all(torch.equal(ta[k], tb[k]) for k in ta)
    with pytest.raises(Exception, match="different settings"):
        Distiller(resume_cfg(tiny_model_dir, tmp_path / "parts", lora=True, lora_rank=4, lr=5e-4))


def local_rows(tmp_path: Path, answers: list[str] | None) -> list[dict]:
    rows = []
    for i in range(4):
        s = make_sample(i, "train")
        image = tmp_path / f"img{i}.png"
        if not image.exists():
            s.image().save(image)
        row = {"id": s.id, "image": str(image), "question": s.question, "options": list(s.options),
               "bbox": list(s.boxes[0])}
        if answers is not None:
            row["answer"] = answers[i]
        rows.append(row)
    return rows


def test_labels_are_never_read(tiny_model_dir, tmp_path):
    """The same prompts with true, scrambled or no answers train to bit-identical weights."""
    true = [make_sample(i, "train").answer for i in range(4)]
    scrambled = ["D" if a != "D" else "A" for a in true]
    sources = []
    for name, answers in (("true", true), ("scrambled", scrambled), ("none", None)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in local_rows(tmp_path, answers)) + "\n")
        sources.append(f"local:{path}")
    results = []
    for k, source in enumerate(sources):
        # no weight decay: the weights can then move only through gradients, which the last check proves flowed
        cfg = tiny_cfg(tiny_model_dir, tmp_path / f"run{k}", data=source, data_limit=None, steps=2, n_rollouts=1,
                       max_new_tokens=2, weight_decay=0.0)
        results.append(model_tensors(Distiller(cfg).train().model_dir))
    for other in results[1:]:
        for key in results[0]:
            assert torch.equal(results[0][key], other[key]), key
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    moved = [k for k in start if not torch.equal(start[k], results[0][k])]
    assert len(moved) >= len(start) // 2, (len(moved), len(start))  # gradients reached most tensors


def test_lora_trains_the_adapter_only_and_saves_a_mergeable_model(tiny_model_dir, tmp_path):
    from vopd_bench.modeling import load_model
    from vopd_train.checkpoint import merge_lora

    cfg = tiny_cfg(tiny_model_dir, tmp_path / "lora", lora=True, lora_rank=4, teacher="frozen", steps=2)
    d = Distiller(cfg)
    trainable = [n for n, p in d.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # the frozen LoRA teacher is the base with the adapter off: after training it still scores like the start
    base, _ = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    d.train_step(0)
    d.step = 1
    from vopd_train.rollout import build_sequences, encode_prompts, response_hidden

    r = d.data.prompts[0].render()
    enc = encode_prompts(d.processor, [r.teacher_image], [r.text])
    batch = build_sequences(enc, [[40, 41]], [0], d.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(d.teacher.hidden(batch), response_hidden(base, batch), rtol=1e-5, atol=1e-5)
        live = response_hidden(d.model, batch)
    assert not torch.allclose(live, response_hidden(base, batch), atol=1e-6)  # while the student has moved
    result = d.train()
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    merged = merge_lora(str(tiny_model_dir), tmp_path / "lora" / "adapter", tmp_path / "merged")
    a, b = model_tensors(result.model_dir), model_tensors(merged)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(start[k], a[k]) for k in start if k in a)


def test_cli_end_to_end_with_remeasure_and_reload_in_gap_report(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from vopd_train.cli import app

    out = tmp_path / "e2e"
    args = ["distill", str(tiny_model_dir), "--data", "synthetic:train", "--out", str(out), "--data-limit", "4",
            "--steps", "2", "--batch-size", "2", "--n-rollouts", "2", "--max-new-tokens", "3", "--topk", "10",
            "--lr", "1e-3", "--teacher", "trust-region", "--remeasure-limit", "4", "--eval-max-new-tokens", "2",
            "--quiet", "--threads", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "before" in res.output.lower()
    import pandas as pd

    table = pd.read_csv(out / "before_after.csv")
    assert list(table.columns) == ["benchmark", "category", "metric", "before", "after", "delta", "ci_low", "ci_high", "n"]
    row = table[(table.metric == "acc_full") & (table.category == "all")].iloc[0]
    assert row.benchmark == "synthetic" and row.n == 4
    assert row.delta == pytest.approx(row.after - row.before)
    assert (out / "before_after.png").is_file() and (out / "train_curves.png").is_file()
    # the trained model was reloaded by gap-report: its records carry a different fingerprint than the start's
    after = [json.loads(line) for line in (out / "after" / "samples.jsonl").read_text().splitlines()]
    before = [json.loads(line) for line in (out / "before" / "samples.jsonl").read_text().splitlines()]
    assert after and all(r["error"] is None for r in after)
    assert {r["model"] for r in after}.isdisjoint({r["model"] for r in before})
    saved = (out / "config.yaml").read_text()
    assert "teacher: trust-region" in saved and "preset_applied: {}" in saved
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2
