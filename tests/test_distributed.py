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


def torchrun(n: int, mode: str, config: dict, expect_ok: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {}),
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


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_gumbel_max_draws_from_the_tempered_softmax(temperature):
    """At T ≠ 1 the draws follow softmax(z/T), through the options `generate` gets (a sampler, or options, that
    dropped the temperature would follow softmax(z) instead: 0.24 away on the first token at T = 0.5)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    n = 20000
    opts = sampling.generate_options(list(range(n)), 1, temperature)
    assert opts["temperature"] is None and not opts["do_sample"]  # generate's own warpers must not apply it twice
    (proc,) = opts["logits_processor"]
    picks = proc(torch.zeros((n, 3), dtype=torch.long), logits.expand(n, -1).clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=5).double() / n
    expected = torch.softmax(logits.double() / temperature, -1)
    untempered = torch.softmax(logits.double(), -1)
    assert (expected - untempered).abs().max() > 0.1  # the test can tell the two apart
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
    """LoRA with the EMA adapter teacher and the crop anchor (a second loss and backward per micro-batch through
    the gathered head), HF generate rollouts: the same tokens, the same divergences and anchors."""
    cfg = distill_cfg(tiny_model_dir, tmp_path / "two", lora=True, teacher="ema", teacher_rate=0.5, crop_anchor=0.3)
    torchrun(2, "distill", cfg)
    run_one({**cfg, "out": str(tmp_path / "one")})
    two, one = log_of(tmp_path / "two"), log_of(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(two, one, strict=True):
        assert a["tokens"] == b["tokens"] and a["sequences"] == b["sequences"] == 8
        assert a["divergence"] == pytest.approx(b["divergence"], rel=1e-3)
        assert a["anchor"] == pytest.approx(b["anchor"], rel=1e-3, abs=1e-9)
        assert a["agree"] == pytest.approx(b["agree"], abs=1e-6)
    assert one[-1]["anchor"] > 0


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


# ------------------------------------------------------------------ sharded from the first byte


def _rank_results(prefix: Path, n: int) -> list[dict]:
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def untied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with an LM head of its own (not tied to the input embeddings)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = False
    head = torch.nn.Linear(model.config.text_config.hidden_size, model.config.text_config.vocab_size, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
    model.lm_head = head
    out = tmp_path_factory.mktemp("untied-vlm")
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_sharded_lm_head_gives_the_replicated_heads_loss_and_gradients(tied, tiny_model_dir, untied_model_dir,
                                                                       tmp_path):
    """The LM head is sharded like every other weight: the loss gathers it once and applies it chunk by chunk.
    Two ranks scoring 5 and 13 tokens (2 and 4 chunks) get the losses of a replicated model on each rank and,
    after FSDP's reduce-scatter, the gradients a replicated model gets by summing over ranks: every weight's,
    the head's (and, tied, the embeddings' sharing it) included."""
    model = tiny_model_dir if tied else untied_model_dir
    torchrun(2, "head", {"model": str(model), "result": str(tmp_path / "head")})
    ranks = _rank_results(tmp_path / "head", 2)
    assert [r["tokens"] for r in ranks] == [5, 13]
    for r in ranks:
        assert r["head_sharded"] and r["loss"] > 0
        assert r["loss_diff"] <= 1e-6, r
        assert r["grads"] > 20 and r["grad_rel_err"] <= 1e-6, r


# Set-up memory that does not shrink with more ranks (see test_setup_memory_is_a_share_of_the_model): 136 MiB
# measured on the 0.6M-parameter tiny model at 2 and 4 ranks (the processor, the data, the module trees of
# student and teacher), plus up to ~130 MB for the one forward through the root that readies FSDP (the gathered
# parameters of a layer and of the prefetched next one, with their all-gather buffers: 4 × 33 MiB here).
SETUP_OVERHEAD_MIB = 300


@pytest.fixture(scope="module")
def model_100m_dir(tiny_model_dir, tmp_path_factory):
    """A 105M-parameter Qwen2-VL (the tiny model's processor and vision tower, a 12-layer 768-wide language
    model), random, saved as safetensors: 399 MiB in float32."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_model_dir)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 768, 3072, 12
    text.num_attention_heads, text.num_key_value_heads = 12, 4
    text.layer_types = ["full_attention"] * 12
    text.rope_parameters["mrope_section"] = [8, 12, 12]  # head dim 64
    config.vision_config.hidden_size = 768
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    out = tmp_path_factory.mktemp("vlm-100m")
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("world", [2, 4])
def test_setup_memory_is_a_share_of_the_model(world, model_100m_dir, tmp_path):
    """Building the trainer under torchrun (full fine-tuning with an EMA teacher: two models' weights) takes each
    rank at most 1.3 × (2 × the fp32 model / N) of memory above what it held before, plus a fixed overhead, on a
    model of 105M parameters (399 MiB). Loading the whole model on every rank and deep-copying it for the teacher,
    as vopd did before, took 1,042 MiB per rank at 2 ranks and 920 MiB at 4, over these bounds of 819 and 559.

    The memory is the process's peak resident set above its level after imports. glibc's allocator is told to
    give large freed blocks back at once (MALLOC_MMAP_THRESHOLD_): by default it keeps FSDP's freed all-gather
    buffers in its heap, which the process reuses but which would count here, up to 440 MiB on this model."""
    path, n_params = model_100m_dir
    assert n_params >= 100e6
    cfg = distill_cfg(path, tmp_path / "out", teacher="ema", batch_size=world, result=str(tmp_path / "mem"))
    torchrun(world, "setup-memory", cfg, env={"MALLOC_MMAP_THRESHOLD_": str(2**20)})
    full_mb = n_params * 4 / 2**20
    bound = 1.3 * 2 * full_mb / world + SETUP_OVERHEAD_MIB
    for r in _rank_results(tmp_path / "mem", world):
        used = (r["peak_kib"] - r["before_kib"]) / 1024
        assert r["local_params"] <= n_params / world * 1.01 + 1e5
        assert used <= bound, f"rank set-up peak {used:.0f} MiB > {bound:.0f} MiB (model {full_mb:.0f} MiB, {world} ranks)"


def test_distill_validates_under_torchrun_as_one_process_does(tmp_path):
    """--eval-every under torchrun: the sharded model answers the validation questions in place (each rank its
    share, in step: 3 batches over 2 ranks), the rows in train_log.jsonl and the kept best step equal one
    process's, and OUT/model holds the best weights, read back from the ranks' shards (the toy model, which
    answers crops right and full images mostly wrong, at a learning rate that moves its answers in 4 steps)."""
    cfg = distill_cfg("toy", tmp_path / "two", lora=True, teacher="frozen", seed_engine=True, steps=4,
                      eval_every=2, eval_limit=8, eval_batch_size=8, lr=0.05, keep_last=True)
    torchrun(2, "distill", cfg)
    run_one({**cfg, "out": str(tmp_path / "one")})
    evals = [[r for r in log_of(tmp_path / d) if r.get("kind") == "eval"] for d in ("two", "one")]
    assert [r["step"] for r in evals[0]] == [0, 2, 4]
    keys = ("acc_full", "acc_crop", "acc_box", "n", "best")
    assert [[r[k] for k in keys] for r in evals[0]] == [[r[k] for k in keys] for r in evals[1]]
    assert len({(r["acc_full"], r["acc_crop"]) for r in evals[1]}) > 1  # the weights moved the answers
    best = [json.loads((tmp_path / d / "best" / "best.json").read_text()) for d in ("two", "one")]
    assert best[0]["step"] == best[1]["step"]
    assert (tmp_path / "two" / "best" / "dcp").is_dir()  # each rank's shards, never gathered
    assert best[1]["step"] != 4  # so OUT/model is not simply the last weights
    # the best weights to 1e-5; the last ones, after 4 Adam steps at this rate (which turns float-rounding
    # differences of near-zero gradients into whole steps), to 1e-3
    for name, rel in (("model", 1e-5), ("model_last", 1e-3)):
        a, b = (load_file(tmp_path / d / name / "model.safetensors") for d in ("two", "one"))
        assert a.keys() == b.keys()
        for k in a:
            assert_rel_close(a[k], b[k], rel)


SHARD_ON_META = """
import json, sys, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from transformers import AutoConfig, AutoModelForImageTextToText
from vopd_train import fsdp
dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=8)
with torch.device("meta"):
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(sys.argv[1]))
fsdp.shard_model(model, "cuda", dist.group.WORLD)
print(json.dumps({n: [type(p).__name__, str(p.device), list(p.shape), list(p.to_local().shape), str(p.placements)]
                  for n, p in model.named_parameters()}))
"""


def test_shard_model_lays_out_a_meta_model_over_a_fake_group(tiny_model_dir):
    """`fsdp.shard_model(model, device, group)` is a pure layout step: on a meta-device model, over a fake process
    group of 8 ranks (what a memory plan uses, no GPU and no peers), every parameter, the tied LM head included,
    becomes a meta DTensor holding this rank's rows of the first dimension (rank 3: rows 3·⌈n/8⌉ onwards)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SHARD_ON_META, str(tiny_model_dir)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    params = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "model.language_model.embed_tokens.weight" in params and "lm_head.weight" not in params  # tied: one
    for name, (kind, device, full, local, placements) in params.items():
        assert (kind, device, placements) == ("DTensor", "meta", "(Shard(dim=0),)"), name
        per = -(-full[0] // 8)
        assert local == [max(0, min(per, full[0] - 3 * per)), *full[1:]], name
