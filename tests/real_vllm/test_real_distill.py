"""`vopd distill --rollout-engine vllm` on a real engine: after every weight sync the engine's greedy answers equal
transformers' on the trainer's current weights, and the importance weights (vLLM's log-probs as π_rollout)
stay within [0.98, 1.02] with both sides in float32; full fine-tuning and LoRA; a resumed run re-syncs the saved
weights before its first rollout."""

from __future__ import annotations

import pytest
from conftest import MEMORY_SHARE
from engine_checks import hf_greedy, rollout_logprob_gaps, vllm_greedy

from vopd_train.config import DistillConfig
from vopd_train.rollout import SamplingSettings
from vopd_train.trainer import Distiller

STEPS = 10
PROBES = 6  # prompts whose greedy answers are compared after every sync


def distill_cfg(model_dir, out, **kw) -> DistillConfig:
    base = dict(model=str(model_dir), data="synthetic:train", out=str(out), steps=STEPS, batch_size=2, n_rollouts=4,
                max_new_tokens=8, micro_batch_size=8, lr=5e-3, warmup_steps=0, topk=20, seed=0, teacher="ema",
                importance_weight=True, rollout_engine="vllm", vllm_gpu_memory_utilization=MEMORY_SHARE,
                remeasure=False, quiet=True, threads=1, save_every=100)
    base.update(kw)
    return DistillConfig(**base)


def run_and_check(d: Distiller, steps: range, figures: dict, label: str) -> None:
    probes, _ = d._render(list(range(PROBES)))
    start = vllm_greedy(d.engine, probes)
    assert start == hf_greedy(d.model, d.processor, d.engine, probes)
    weights, moved = [], 0
    for k in steps:
        stats = d.train_step(k)
        d.step = k + 1
        weights.append(stats.is_weight)
        got = vllm_greedy(d.engine, probes)
        assert got == hf_greedy(d.model, d.processor, d.engine, probes), f"step {k + 1}: the engine is not the trainer"
        moved += got != start
    figures[f"distill_{label}"] = {"steps": len(weights), "is_weight_min": min(weights),
                                   "is_weight_max": max(weights), "syncs_that_changed_answers": moved,
                                   "sync_seconds": round(d.engine.last_sync.seconds, 4),
                                   "sync_buckets": d.engine.last_sync.buckets, "sync_mib": d.engine.last_sync.bytes / 2**20}
    assert all(0.98 <= w <= 1.02 for w in weights), weights
    assert moved >= 3  # the weights moved the answers: agreement after a sync is not agreement by default


def test_full_fine_tuning(base_engine, vllm_tiny, tmp_path, figures):
    d = Distiller(distill_cfg(vllm_tiny, tmp_path / "full"), engine=base_engine)
    run_and_check(d, range(STEPS), figures, "full")
    # what the importance weights rest on, after ten syncs: vLLM's log-prob of each sampled token is transformers'
    # over the same distribution (vision tokens banned), so a weight's distance from 1 is the banned tokens' mass
    probes, _ = d._render(list(range(PROBES)))
    gaps = rollout_logprob_gaps(d.engine, d.model, probes, SamplingSettings(n=2, temperature=0.7, max_new_tokens=8))
    figures["distill_full_rollout_logprobs"] = gaps
    assert gaps["max_abs_diff_renormalised"] < 1e-3
    assert -0.02 < gaps["mean_log_ratio_unbanned"] < 0


def test_lora_syncs_the_merged_adapted_layers(base_engine, vllm_tiny, tmp_path, figures):
    """An adapter on the query projections only: each sync sends those layers merged, with the key, value and
    output projections of their attention blocks (vLLM rebuilds q, k, v as one layer), and nothing else."""
    d = Distiller(distill_cfg(vllm_tiny, tmp_path / "lora", lora=True, lora_rank=4, lora_targets="q_proj",
                              lr=5e-2), engine=base_engine)
    run_and_check(d, range(STEPS), figures, "lora")
    hf = d.model.get_base_model()
    attention = sum(p.numel() for n, p in hf.named_parameters()
                    if ".self_attn." in n and "lora_" not in n) * 4  # float32 bytes
    assert d.engine.last_sync.bytes == attention


def test_resume_resyncs_the_saved_weights_before_the_first_rollout(base_engine, vllm_tiny, tmp_path, figures):
    out = tmp_path / "killed"
    first = Distiller(distill_cfg(vllm_tiny, out, steps=6, save_every=2), engine=base_engine)
    for k in range(3):  # saved after step 2, then one more step: the engine holds step 3's weights when killed
        first.train_step(k)
        first.step = k + 1
        if first.step % 2 == 0:
            first.save_state()
    probes, _ = first._render(list(range(PROBES)))
    killed = vllm_greedy(base_engine, probes)
    del first
    resumed = Distiller(distill_cfg(vllm_tiny, out, steps=6, save_every=2), engine=base_engine)
    assert resumed.step == 2
    saved = hf_greedy(resumed.model, resumed.processor, base_engine, probes)
    assert saved != killed  # step 2's weights answer otherwise than step 3's: the engine had to be re-synced
    assert vllm_greedy(base_engine, probes) == saved
    run_and_check(resumed, range(2, 6), figures, "resumed")


@pytest.mark.parametrize("flag", ["--vllm-sleep-mode"])
def test_sleep_mode_on_a_cpu_is_one_line_before_any_work(vllm_tiny, tmp_path, flag):
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "vopd_bench.cli", "distill", str(vllm_tiny), "--data", "synthetic:train",
                          "--out", str(tmp_path / "x"), "--rollout-engine", "vllm", flag, "--steps", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "Traceback" not in run.stderr + run.stdout
    assert run.stderr.strip().splitlines()[-1] == (
        "error: --vllm-sleep-mode: vLLM has no sleep mode on this platform (cpu); drop the flag (the engine then "
        "keeps its memory between rollouts)")
    assert not (tmp_path / "x" / "config.yaml").exists()  # refused before the run started
    assert time.perf_counter() - start < 120
