"""torchrun on CPU with gloo: data-parallel gap-report and FSDP2 distill against single-process runs, resume
across world sizes, and the pieces underneath (work shares, shard merging, batch-invariant sampling)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from vopd_bench import distributed
from vopd_bench.records import Record
from vopd_bench.runner import GapReportConfig, rank_share, run_gap_report
from vopd_bench.store import RecordStore, merge_shards, shard_path
from vopd_train import sampling

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = Path(__file__).with_name("dist_worker.py")


def torchrun(n: int, mode: str, config: dict, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           str(WORKER), mode, json.dumps(config)], env=env, capture_output=True, text=True,
                          timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------ pieces


def test_place_from_env():
    assert distributed.place_from_env({}) == distributed.Place(0, 1, 0, distributed.place_from_env({}).device)
    p = distributed.place_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (p.rank, p.world_size, p.local_rank, p.enabled, p.is_main) == (3, 4, 1, True, False)
    with pytest.raises(Exception, match="inconsistent"):
        distributed.place_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_rank_shares_are_disjoint_whole_batches_covering_everything():
    todo = [[f"s{i}"] for i in range(23)]
    shares = [rank_share(todo, 4, r, 3) for r in range(3)]
    assert sorted(s for share in shares for s in share) == sorted(todo)
    # blocks of 4 dealt round-robin: rank 1 gets samples 4-7 and 16-19
    assert shares[1] == todo[4:8] + todo[16:20]
    assert rank_share(todo, 4, 0, 1) == todo


def _rec(key: str, correct: bool | None = True, error: str | None = None) -> Record:
    return Record(key=key, benchmark="b", sample_id=key, view="full", correct=correct, error=error)


def test_merge_shards_keeps_one_record_per_key_and_is_safe_to_repeat(tmp_path):
    main = tmp_path / "samples.jsonl"
    RecordStore(main).append([_rec("a"), _rec("b", None, "timeout")])
    RecordStore(shard_path(main, 0)).append([_rec("b"), _rec("c")])  # b retried successfully
    RecordStore(shard_path(main, 1)).append([_rec("d")])
    with shard_path(main, 1).open("a") as f:
        f.write('{"key": "e", "bench')  # a torn last line: the in-flight batch of a killed rank
    assert merge_shards(main) == 3  # b, c and d; the torn line is dropped
    assert not list(tmp_path.glob("samples.rank*.jsonl"))
    lines = [json.loads(x) for x in main.read_text().splitlines()]
    assert sorted(r["key"] for r in lines) == ["a", "b", "c", "d"]
    assert next(r for r in lines if r["key"] == "b")["error"] is None
    RecordStore(shard_path(main, 0)).append([_rec("c")])  # merged again (e.g. killed before the delete)
    merge_shards(main)
    assert len(main.read_text().splitlines()) == 4


def test_gumbel_noise_depends_on_the_row_seed_not_the_batch():
    seeds = torch.tensor([11, 22, 33], dtype=torch.int64)
    full = sampling.uniform_noise(seeds, 5, 50)
    alone = sampling.uniform_noise(seeds[1:2], 5, 50)
    assert torch.equal(full[1:2], alone)
    assert not torch.equal(full[0], full[1]) and not torch.equal(full, sampling.uniform_noise(seeds, 6, 50))
    assert 0 < float(full.min()) and float(full.max()) < 1


def test_gumbel_max_draws_from_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    n = 20000
    proc = sampling.GumbelMaxSampler(list(range(n)), temperature=1.0)
    picks = proc(torch.zeros((n, 3), dtype=torch.long), logits.expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / n
    expected = torch.softmax(logits.double(), -1)
    assert freq[4] == 0  # a banned token is never drawn
    # binomial standard error at n = 20000 is at most 0.0036: allow 4 of them
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_seeds_are_stable_and_distinct():
    assert sampling.prompt_seed(0, 3, 17) == sampling.prompt_seed(0, 3, 17)
    seeds = {sampling.row_seed(sampling.prompt_seed(0, s, i), j) for s in range(5) for i in range(40) for j in range(8)}
    assert len(seeds) == 5 * 40 * 8 and all(0 <= x < 2**31 for x in seeds)


# ------------------------------------------------------------------ gap-report


def gap_cfg(out: Path, **kw) -> dict:
    return {"model": "toy", "limit": 14, "batch_size": 4, "out": str(out), "quiet": True,
            "backend_options": {"threads": 1}, **kw}


def records_of(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in (path / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")  # wall time, the one field that differs between runs
    return sorted(rows, key=lambda r: r["key"])


@pytest.fixture(scope="module")
def gap_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("gap") / "one"
    run_gap_report(GapReportConfig(**gap_cfg(out)))
    return out


def test_gap_report_two_ranks_equal_one_process(gap_reference, tmp_path):
    torchrun(2, "gap-report", gap_cfg(tmp_path / "two"))
    assert records_of(tmp_path / "two") == records_of(gap_reference)
    assert len(records_of(gap_reference)) == 14 * 3
    assert (tmp_path / "two" / "summary.csv").read_bytes() == (gap_reference / "summary.csv").read_bytes()
    assert not list((tmp_path / "two").glob("*.rank*.jsonl"))


def test_gap_report_killed_rank_then_finished_on_one_process(gap_reference, tmp_path):
    out = tmp_path / "killed"
    proc = torchrun(2, "gap-report", gap_cfg(out, kill_rank=1, kill_after=1), expect_ok=False)
    assert proc.returncode != 0
    assert not (out / "summary.csv").exists()
    # rank 1 lost nothing it had finished: its first batch (3 views × 4 samples: 4 records per view) is on disk
    done = RecordStore(shard_path(out / "samples.jsonl", 1)).records
    assert len(done) == 4
    run_gap_report(GapReportConfig(**gap_cfg(out)))  # the same run, finished by one process
    assert records_of(out) == records_of(gap_reference)  # nothing lost, nothing twice
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), pd.read_csv(gap_reference / "summary.csv"))


# ------------------------------------------------------------------ distill


def distill_cfg(model_dir, out: Path, **kw) -> dict:
    return {"model": str(model_dir), "data": "synthetic:train", "out": str(out), "data_limit": 16, "steps": 3,
            "batch_size": 4, "n_rollouts": 2, "max_new_tokens": 3, "micro_batch_size": 2, "lr": 1e-2,
            "warmup_steps": 0, "topk": 20, "seed": 0, "remeasure": False, "quiet": True, "threads": 1, **kw}


def run_one(config: dict):
    from dist_worker import SeedEngine

    from vopd_train.config import DistillConfig
    from vopd_train.trainer import Distiller

    config = dict(config)
    engine = SeedEngine() if config.pop("seed_engine", False) else None
    d = Distiller(DistillConfig(**config), engine=engine)
    d.train()
    return d


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """‖a − b‖ ≤ rel·‖b‖ over the whole tensor (element-wise ratios are meaningless for weights near 0)."""
    err, scale = float((a.double() - b.double()).norm()), float(b.double().norm())
    assert err <= rel * max(scale, 1e-12), (err, scale)


def log_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_distill_two_ranks_sample_and_score_like_one_process(tiny_model_dir, tmp_path):
    """LoRA with the EMA adapter teacher, HF generate rollouts: the same tokens, the same divergences."""
    cfg = distill_cfg(tiny_model_dir, tmp_path / "two", lora=True, teacher="ema", teacher_rate=0.5)
    torchrun(2, "distill", cfg)
    run_one({**cfg, "out": str(tmp_path / "one")})
    two, one = log_of(tmp_path / "two"), log_of(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one, strict=True):
        assert a["tokens"] == b["tokens"] and a["sequences"] == b["sequences"] == 8
        assert a["divergence"] == pytest.approx(b["divergence"], rel=1e-3)
        assert a["agree"] == pytest.approx(b["agree"], abs=1e-6)


def test_distill_two_ranks_take_the_same_steps_and_resume_on_one(tiny_model_dir, tmp_path):
    """Full fine-tuning, EMA teacher (a sharded copy), fixed rollouts of uneven lengths and uneven micro-batch
    counts per rank, seq-mean over the global batch: after 3 steps the weights match one process; the 2-rank
    DCP state then resumes in one process and matches a straight 4-step run."""
    cfg = distill_cfg(tiny_model_dir, tmp_path / "two", teacher="ema", teacher_rate=0.5, seed_engine=True,
                      lr=1e-3, save_every=3)
    torchrun(2, "distill", cfg)
    one = run_one({**cfg, "out": str(tmp_path / "one")})
    a, b = load_file(tmp_path / "two" / "model" / "model.safetensors"), load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    moved = 0
    for k in a:
        assert_rel_close(a[k], b[k])
        moved += not torch.equal(b[k], start[k])
    assert moved > 10
    assert json.loads((tmp_path / "two" / "state" / "trainer_state.json").read_text())["format"] == "dcp"

    one.total_steps = 4  # the single process goes on to step 4 ...
    one.train()
    resumed = run_one({**cfg, "steps": 4, "out": str(tmp_path / "two")})  # ... and so does the 2-rank run, alone
    assert resumed.step == 4 and [r["step"] for r in log_of(tmp_path / "two")] == [1, 2, 3, 4]
    a, b = load_file(tmp_path / "two" / "model" / "model.safetensors"), load_file(tmp_path / "one" / "model" / "model.safetensors")
    for k in a:
        assert_rel_close(a[k], b[k])
    ta, tb = one.teacher.state_tensors(), resumed.teacher.state_tensors()
    for k in ta:
        assert_rel_close(tb[k], ta[k])


def test_distill_single_process_state_resumes_on_two_ranks(tiny_model_dir, tmp_path):
    """LoRA with the EMA adapter teacher: 2 steps in one process, the third on 2 ranks = 3 steps in one process."""
    cfg = distill_cfg(tiny_model_dir, tmp_path / "ref", lora=True, teacher="ema", teacher_rate=0.5,
                      seed_engine=True, lr=1e-3, save_every=2)
    ref = run_one(cfg)
    run_one({**cfg, "steps": 2, "out": str(tmp_path / "part")})
    torchrun(2, "distill", {**cfg, "out": str(tmp_path / "part")})
    assert [r["step"] for r in log_of(tmp_path / "part")] == [1, 2, 3]
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("part", "ref"))
    assert a.keys() == b.keys()
    for k in a:
        assert_rel_close(a[k], b[k])
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert sum(not torch.equal(a[k], start[k]) for k in a) > 10  # the merged adapter moved the weights
    # the EMA adapter the 2 ranks saved (in their DCP state) is the one-process run's
    reloaded = run_one({**cfg, "out": str(tmp_path / "part")})  # resumes at step 3 of 3: loads, trains nothing
    assert reloaded.step == 3
    ema, got = ref.teacher.state_tensors(), reloaded.teacher.state_tensors()
    assert ema.keys() == got.keys()
    for k in ema:
        assert_rel_close(got[k], ema[k])
