"""Validation during training, the best checkpoint, resume keeping the best, the crop anchor and replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vopd_bench.errors import VopdError
from vopd_train.best import BestKeeper, pick_best, score
from vopd_train.config import DistillConfig
from vopd_train.data import replay_count, replay_source
from vopd_train.evaluate import summarise
from vopd_train.losses import anchor_divergence
from vopd_train.remeasure import validation_benchmarks
from vopd_train.rollout import Rollout
from vopd_train.trainer import Distiller

pytestmark = pytest.mark.usefixtures("one_thread")


def m(full: float, crop: float) -> dict:
    return {"acc_full": full, "acc_crop": crop, "acc_box": None, "gap": crop - full,
            "mean_full_crop": (full + crop) / 2, "n": 100, "n_left_out": 0}


# step: (full, crop). Full keeps rising; crop collapses after step 3, so the two criteria disagree.
PLANTED = {0: m(0.25, 1.00), 1: m(0.50, 1.00), 2: m(0.80, 0.98), 3: m(0.90, 0.96), 4: m(0.95, 0.70)}


def test_best_checkpoint_selection_with_a_planted_evaluation_sequence(tmp_path):
    seq = list(PLANTED.items())
    # means: .625 .75 .89 .93 .825 -> step 3; full alone -> step 4
    assert pick_best(seq, "mean_full_crop").step == 3
    assert pick_best(seq, "full").step == 4
    assert pick_best(seq, "mean_full_crop").score == pytest.approx(0.93)
    # a tie keeps the earlier step (fewer updates away from the start)
    assert pick_best([(1, m(0.5, 0.9)), (2, m(0.6, 0.8)), (3, m(0.4, 1.0))], "mean_full_crop").step == 1
    with pytest.raises(VopdError, match="keep-best"):
        score(m(0, 0), "crop")

    keeper = BestKeeper(tmp_path, "mean_full_crop")
    won = [keeper.offer(step, met, lambda step=step: {"w": torch.full((2,), float(step))}) for step, met in seq]
    assert won == [True, True, True, True, False]
    assert keeper.best.step == 3 and torch.equal(keeper.tensors()["w"], torch.full((2,), 3.0))
    again = BestKeeper(tmp_path, "mean_full_crop")
    again.load()
    assert again.best == keeper.best  # what a resumed run reads
    with pytest.raises(VopdError, match="ranks by mean_full_crop"):
        BestKeeper(tmp_path, "full").load()


def test_summarise_pairs_full_and_crop():
    outcomes = {"a": {"full": True, "crop": True, "box": False}, "b": {"full": False, "crop": True},
                "c": {"full": True}}  # c has no valid crop answer: left out of every metric
    r = summarise(outcomes, n_samples=4)
    assert (r.acc_full, r.acc_crop, r.acc_box, r.n, r.n_left_out) == (0.5, 1.0, 0.0, 2, 2)
    assert (r.gap, r.mean_full_crop) == (0.5, 0.75)


def test_validation_split_is_never_the_trained_or_remeasured_one():
    assert validation_benchmarks(["synthetic:train"], "", ["synthetic:test"]) == ["synthetic:validation"]
    assert validation_benchmarks(["synthetic"], "", ["synthetic:validation"]) == ["synthetic:train"]
    assert validation_benchmarks(["vstar"], "", []) == []
    assert validation_benchmarks(["vstar"], "a, b", []) == ["a", "b"]


class PlantedValidator:
    """Stands in for the validation run: returns PLANTED[step] and keeps the weights it was shown."""

    names, n_samples = ["planted"], 100

    def __init__(self, distiller: Distiller):
        self.d, self.seen = distiller, {}

    def evaluate(self, model, processor):
        step = self.d.step
        self.seen[step] = {n: p.detach().clone() for n, p in model.named_parameters()}

        class Result:
            def metrics(self_inner):
                return dict(PLANTED[step])

        return Result()


class FixedEngine:
    def generate(self, prompts, settings):
        return [Rollout(i, [40 + j, 41]) for i in range(len(prompts)) for j in range(settings.n)]

    def sync_weights(self, model):
        return None


def best_cfg(model_dir, out, **kw) -> DistillConfig:
    base = dict(model=str(model_dir), data="synthetic:train", out=str(out), data_limit=6, steps=4, batch_size=2,
                n_rollouts=1, max_new_tokens=2, micro_batch_size=4, lr=1e-2, warmup_steps=0, topk=20, seed=0,
                remeasure=False, quiet=True, threads=1, teacher="frozen", eval_every=1, eval_limit=2, save_every=10)
    base.update(kw)
    return DistillConfig(**base)


def planted_run(cfg: DistillConfig) -> tuple[Distiller, PlantedValidator]:
    d = Distiller(cfg, engine=FixedEngine())
    d.validator = PlantedValidator(d)
    return d, d.validator


def test_model_dir_holds_the_best_evaluated_weights_and_config_says_why(tiny_model_dir, tmp_path):
    from vopd_bench.modeling import load_model

    d, v = planted_run(best_cfg(tiny_model_dir, tmp_path / "run", keep_last=True))
    result = d.train()
    assert result.best.step == 3 and sorted(v.seen) == [0, 1, 2, 3, 4]
    saved, last = (dict(load_model(str(p), device="cpu", dtype="float32")[0].named_parameters())
                   for p in (result.model_dir, tmp_path / "run" / "model_last"))
    assert saved.keys() == v.seen[3].keys()
    assert all(torch.equal(saved[n], v.seen[3][n]) and torch.equal(last[n], v.seen[4][n]) for n in saved)
    assert any(not torch.equal(saved[n], last[n]) for n in saved)
    evals = [r for r in map(json.loads, (tmp_path / "run" / "train_log.jsonl").read_text().splitlines())
             if r.get("kind") == "eval"]
    assert [(r["step"], r["best"]) for r in evals] == [(0, True), (1, True), (2, True), (3, True), (4, False)]
    assert evals[3]["acc_crop"] == 0.96 and evals[3]["mean_full_crop"] == pytest.approx(0.93)
    import yaml

    best = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["best"]
    assert best["step"] == 3 and best["criterion"] == "mean_full_crop" and "mean of full and crop" in best["why"]
    assert (tmp_path / "run" / "train_curves.png").is_file()


def test_resume_keeps_the_best_so_far(tiny_model_dir, tmp_path):
    # stopped after step 3 (its state saved right after the evaluation), then continued to step 4:
    # step 4 scores lower, so the weights of step 3, found before the stop, are the result
    first, _ = planted_run(best_cfg(tiny_model_dir, tmp_path / "parts", steps=3))
    first.train()
    second, seen = planted_run(best_cfg(tiny_model_dir, tmp_path / "parts"))
    assert second.step == 3 and second.best.best.step == 3
    result = second.train()
    assert sorted(seen.seen) == [4] and result.best.step == 3
    straight, _ = planted_run(best_cfg(tiny_model_dir, tmp_path / "straight"))
    expected = straight.train()
    a, b = (load_file(r.model_dir / "model.safetensors") for r in (result, expected))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a fresh run in the same folder forgets that best
    third, _ = planted_run(best_cfg(tiny_model_dir, tmp_path / "parts", restart=True))
    assert third.best.best is None and not (tmp_path / "parts" / "best").exists()


def test_anchor_divergence_is_exactly_zero_at_the_start():
    torch.manual_seed(0)
    z = torch.randn(5, 50, requires_grad=True)
    for topk, tail in ((None, True), (10, True), (10, False)):
        assert torch.equal(anchor_divergence(z, z.detach().clone(), topk=topk, add_tail=tail), torch.zeros(5))
    moved = anchor_divergence(z, z.detach() + torch.randn(5, 50))
    assert (moved > 0).all()
    moved.sum().backward()
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("lora", [True, False])
def test_crop_anchor_is_zero_while_the_student_is_the_starting_model(tiny_model_dir, tmp_path, lora):
    # an EMA teacher: the anchor needs its own frozen reference; with LoRA, 3 rollouts a prompt: the reference and
    # the student then share each prompt's prefix, and must take the same path to agree exactly
    cfg = best_cfg(tiny_model_dir, tmp_path / f"a{lora}", eval_every=None, crop_anchor=1.0, lora=lora, lora_rank=4,
                   teacher="ema", n_rollouts=3 if lora else 1)
    d = Distiller(cfg, engine=FixedEngine())
    first = d.train_step(0)
    assert first.anchor == 0.0  # exactly: LoRA starts with B = 0, full fine-tuning's reference is a copy
    second = d.train_step(1)
    assert second.anchor > 0  # the first update moved the crop view too, and the anchor sees it
    plain = Distiller(best_cfg(tiny_model_dir, tmp_path / f"p{lora}", eval_every=None, lora=lora, lora_rank=4,
                               teacher="ema"), engine=FixedEngine())
    assert plain.train_step(0).anchor is None


def write_mined(folder: Path, split_ids: dict[str, range]) -> Path:
    from vopd_bench.benchmarks.synthetic import make_sample

    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in split_ids.items():
        rows = [{"benchmark": "synthetic:train", "sample_id": make_sample(i, "train").id, "image": None}
                for i in ids]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "failures.jsonl"


def test_replay_mixes_a_fixed_share_of_both_right_cases(tiny_model_dir, tmp_path):
    assert [replay_count(32, s) for s in (0.0, 0.25, 0.01, 0.99)] == [0, 8, 1, 31]
    lonely = write_mined(tmp_path / "lonely", {"failures.jsonl": range(3)})
    with pytest.raises(VopdError, match="both_right.jsonl not found"):
        replay_source(str(lonely))
    with pytest.raises(VopdError, match="needs --data to be a gap-report failures.jsonl"):
        replay_source("synthetic:train")
    data = write_mined(tmp_path / "mined", {"failures.jsonl": range(6), "both_right.jsonl": range(6, 10)})
    d = Distiller(best_cfg(tiny_model_dir, tmp_path / "r", data=str(data), data_limit=None, eval_every=None,
                           batch_size=4, replay=0.25), engine=FixedEngine())
    assert (d.n_mined, d.n_replay) == (6, 4)
    for step in range(5):
        idx = d._batch_indices(step)
        assert len(idx) == 4 and sum(i >= 6 for i in idx) == 1  # 3 mined + 1 replayed, every step
    replayed = {d.data.prompts[i].id for step in range(4) for i in d._batch_indices(step) if i >= 6}
    assert replayed == {f"synthetic:train/{i}" for i in ("train-00006", "train-00007", "train-00008", "train-00009")}


def test_the_toy_preset_keeps_the_crop_view(tmp_path):
    from vopd_train.config import TOY_PRESET, resolve

    mined = write_mined(tmp_path / "mined", {"failures.jsonl": range(2)})
    cfg, preset = resolve("toy", {"data": str(mined), "out": "o"})
    assert cfg.crop_anchor == TOY_PRESET["crop_anchor"] > 0 and preset["crop_anchor"] == cfg.crop_anchor
    assert cfg.eval_every and cfg.keep_best == "mean_full_crop"  # the toy is watched, and keeps its best
    assert (cfg.lr, cfg.steps) == (2e-3, 150)  # the 20-minute loop: twice the rate, half the steps
    on_train = resolve("toy", {"data": "synthetic:train", "out": "o"})[0]
    assert (on_train.crop_anchor, on_train.lr, on_train.steps) == (0.3, 1e-3, 300)
    assert resolve("toy", {"data": str(mined), "out": "o", "crop_anchor": 0.0})[0].crop_anchor == 0.0  # a flag wins
    assert resolve("/a/model", {"data": str(mined), "out": "o"})[0].crop_anchor == 0.0


def test_in_place_validation_matches_a_gap_report_of_the_same_weights(tmp_path):
    """The toy evaluated in place, as the trainer does, scores what gap-report scores loading it from disk; the
    model comes back unchanged and in the mode it was in."""
    from vopd_bench.modeling import load_model
    from vopd_bench.runner import GapReportConfig, run_gap_report
    from vopd_train.evaluate import Validator

    model, processor = load_model("toy", device="cpu", dtype="float32")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = Validator(["synthetic:validation"], limit=12, batch_size=8, max_new_tokens=4).evaluate(model, processor)
    assert model.training and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    report = run_gap_report(GapReportConfig(model="toy", benchmarks=["synthetic:validation"], limit=12,
                                            max_new_tokens=4, out=str(tmp_path / "gr"), quiet=True))
    s = report.summary.set_index(["category", "metric"])["value"]
    assert result.n == 12 and result.n_left_out == 0
    assert result.acc_full == pytest.approx(s[("all", "acc_full")])
    assert result.acc_crop == pytest.approx(s[("all", "acc_crop")]) and result.acc_crop > result.acc_full
    assert result.acc_box == pytest.approx(s[("all", "acc_box")])


def test_curves_are_redrawn_during_a_run_at_most_once_a_minute(tiny_model_dir, tmp_path, monkeypatch):
    """After each evaluation only when PLOT_EVERY_S has passed since the last drawing; always at the end."""
    import vopd_train.plots
    import vopd_train.trainer as trainer

    drawn = []
    monkeypatch.setattr(vopd_train.plots, "plot_curves", lambda history, path, **kw: drawn.append(len(history)))
    planted_run(best_cfg(tiny_model_dir, tmp_path / "short", steps=2))[0].train()
    assert drawn == [2]  # a short run: once, at the end, with both steps
    drawn.clear()
    monkeypatch.setattr(trainer, "PLOT_EVERY_S", 0.0)  # a long run: after every evaluation too
    planted_run(best_cfg(tiny_model_dir, tmp_path / "long", steps=2))[0].train()
    assert drawn == [0, 1, 2, 2]
