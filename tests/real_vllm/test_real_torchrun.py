"""vLLM rollouts under torchrun with two real engines, one per rank (`external_launcher`), on gloo.

1. The trainer in two ranks (tests/real_vllm/torchrun_driver.py): each rank's rollouts come from its own engine
   and are its own share of the batch; after every sync (FSDP shards cast, gathered and loaded bucket by bucket)
   each rank's engine answers as transformers does on the trainer's current weights.
2. The same with `--vllm-tensor-parallel-size 2`: the two ranks form one tensor-parallel engine; the rollouts
   each rank keeps are those a one-rank engine gives for its own prompts and seeds, and after every sync the
   engine answers as transformers does.
3. The command users run, `torchrun --nproc-per-node 2 --no-python vopd distill ... --rollout-engine vllm`: it
   starts two engines that split the host's memory, trains, exits cleanly, and the run resumes in one process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from conftest import MEMORY_SHARE

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent  # the environment's torchrun and vopd


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    return env


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """torchrun with two ranks on a free port (`--standalone`), in its own process group: a hung rank is killed
    with it when the timeout ends the run."""
    proc = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout} s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _is_weights(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [r["is_weight"] for r in rows]


def test_each_rank_samples_its_share_from_its_own_engine_and_keeps_it_in_sync(vllm_tiny, tmp_path, figures):
    run = _torchrun(str(HERE / "torchrun_driver.py"), str(vllm_tiny), str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["pid"] != ranks[1]["pid"]  # two processes, each with its engine
    for r in ranks:
        assert [c for c in r["calls"]] == [s["own_share"] for s in r["steps"]]  # its own prompts, every step
        for s in r["steps"]:
            assert s["engine_agrees"], f"rank {r['rank']}: its engine is not the trainer after a sync"
            assert 0.98 <= s["is_weight"] <= 1.02 and s["sync_buckets"] > 1
    assert set(ranks[0]["steps"][0]["own_share"]).isdisjoint(ranks[1]["steps"][0]["own_share"])
    figures["torchrun_2_ranks"] = {"is_weight": [s["is_weight"] for s in ranks[0]["steps"]],
                                   "sync_buckets": ranks[0]["steps"][0]["sync_buckets"]}


def test_two_ranks_share_one_tensor_parallel_engine_and_keep_their_own_rollouts(vllm_tiny, rollout_engine,
                                                                                 tmp_path, figures):
    """K = 2 on 2 ranks (vllm_tiny: 4 attention heads, 2 KV heads, so each rank holds half of each layer)."""
    import pickle
    from dataclasses import asdict, replace

    from torchrun_driver import PROBE_SEEDS

    run = _torchrun(str(HERE / "torchrun_driver.py"), str(vllm_tiny), str(tmp_path), "2")
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # one engine over both ranks: vLLM's tensor-parallel group of 2, ranks 0 and 1, both seeded by the group
    assert [r["tp"] for r in ranks] == [[2, 0], [2, 1]]
    assert sorted(re.findall(r"global random seed is set to (\d+)", text)) == ["0", "0"]
    probes, sampling = pickle.loads((tmp_path / "probes.pkl").read_bytes())
    gaps = []
    for r in ranks:  # what a one-rank engine gives for this rank's prompts and seeds, on the same weights
        mine = slice(2 * r["rank"], 2 * r["rank"] + 2)
        alone = rollout_engine.generate(probes[mine], replace(sampling, prompt_seeds=PROBE_SEEDS[mine]))
        kept = r["own_rollouts"]
        assert len(kept) == len(alone) == 2 * sampling.n
        assert [(k["prompt_index"], k["token_ids"]) for k in kept] == [(a.prompt_index, a.token_ids) for a in alone]
        gap = max(abs(x - y) for k, a in zip(kept, map(asdict, alone), strict=True)
                  for x, y in zip(k["logprobs"], a["logprobs"], strict=True))
        assert gap < 1e-3, gap
        gaps.append(gap)
        assert r["calls"] == [s["own_share"] for s in r["steps"]]  # in training: the rank's own share
        for s in r["steps"]:
            assert s["engine_agrees"], f"rank {r['rank']}: its engine is not the trainer after a sync"
            assert 0.98 <= s["is_weight"] <= 1.02 and s["sync_buckets"] > 1
    assert ranks[0]["own_rollouts"] != ranks[1]["own_rollouts"]
    figures["torchrun_2_ranks_tensor_parallel_2"] = {"is_weight": [s["is_weight"] for s in ranks[0]["steps"]],
                                                     "max_logprob_gap_vs_one_rank_engine": max(gaps)}


def test_vopd_distill_under_torchrun_then_resumed_in_one_process(vllm_tiny, tmp_path, figures):
    out = tmp_path / "run"
    args = ["distill", str(vllm_tiny), "--data", "synthetic:train", "--out", str(out), "--batch-size", "4",
            "--n-rollouts", "2", "--max-new-tokens", "8", "--lr", "5e-3", "--warmup-steps", "0",
            "--rollout-engine", "vllm", "--importance-weight", "--vllm-gpu-memory-utilization", str(MEMORY_SHARE),
            "--vllm-eager", "--sync-bucket-mb", "0.25", "--no-remeasure", "--quiet", "--log-every", "1",
            "--threads", "1"]
    run = _torchrun("--no-python", "vopd", *args, "--steps", "3")
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-3000:]
    assert "Traceback" not in text  # vLLM's clean-up at exit included
    # two engines, one per rank, in their own processes, each with half of the share of the host's memory
    kv = re.findall(r"pid=(\d+)\).*Explicitly set \(([\d.]+)/[\d.]+\) GiB for KV cache", text)
    assert len(kv) == 2 and kv[0][0] != kv[1][0], kv
    assert text.count("split over 2 engine(s) on this host") == 2
    assert text.count("Using external launcher for distributed inference") == 2
    seeds = sorted(re.findall(r"global random seed is set to (\d+)", text))
    assert seeds == ["0", "1"]  # seeded by rank
    first = _is_weights(out)
    assert len(first) == 3 and all(0.98 <= w <= 1.02 for w in first), first
    assert "vllm_dtype: float32" in (out / "config.yaml").read_text()

    one = subprocess.run([str(BIN / "vopd"), *args, "--steps", "5"], capture_output=True, text=True, timeout=600,
                         env=_env())
    text = one.stdout + one.stderr
    assert one.returncode == 0 and "Traceback" not in text, text[-3000:]
    assert "resuming" in text and "at step 3/5" in text
    both = _is_weights(out)
    assert len(both) == 5 and all(0.98 <= w <= 1.02 for w in both), both
    figures["torchrun_cli"] = {"is_weight_2_ranks": first, "is_weight_resumed_1_rank": both[3:],
                               "kv_cache_gib_per_engine": [float(g) for _, g in kv]}
