"""1 process against N under torchrun, for gap-report and distill, as throughput ratios; and the per-GPU memory
and step-time estimate for the paper's setting (Qwen3.5-9B, 96 prompts × 8 rollouts, 8 GPUs) under FSDP2.

    .venv/bin/python benchmarks/scaling.py [--nproc 2] [--limit 96] [--steps 6]
    .venv/bin/python benchmarks/scaling.py --estimate-only

Each measured job runs as its own torchrun launch (also the single process, `--nproc-per-node 1`, so both pay the
same start-up); the timed part excludes start-up and model loading: gap-report's `run_seconds` after a barrier,
distill's median step time from rank 0's `train_log.jsonl` (the first step, a warm-up, left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from vopd_bench import distributed
mode, out, limit, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
place = distributed.init(backend="gloo")
if mode == "gap-report":
    from vopd_bench.backends import get_backend
    from vopd_bench.runner import GapReportConfig, run_gap_report
    cfg = GapReportConfig(model="toy", limit=limit, out=out, quiet=True, backend_options={"threads": 1})
    backend = get_backend("hf", "toy", batch_size=cfg.batch_size, threads=1)
    distributed.barrier()
    t0 = time.perf_counter()
    result = run_gap_report(cfg, backend=backend)
    distributed.barrier()
    seconds = time.perf_counter() - t0
    if place.is_main:
        json.dump({"seconds": seconds, "requests": len(result.records)}, open(out + "/timing.json", "w"))
else:
    from vopd_train.config import resolve
    from vopd_train.trainer import Distiller
    cfg, _ = resolve("toy", {"data": "synthetic:train", "out": out, "steps": steps, "remeasure": False,
                              "quiet": True})
    Distiller(cfg).train()
distributed.shutdown()
"""


def launch(n: int, mode: str, out: Path, limit: int, steps: int) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    script = out.parent / "child.py"
    script.write_text(CHILD)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(script),
           mode, str(out), str(limit), str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    if mode == "gap-report":
        t = json.loads((out / "timing.json").read_text())
        return t["requests"] / t["seconds"]  # requests per second
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return 32 / statistics.median(r["t_step"] for r in rows[1:])  # prompts per second (toy preset: 32 per step)


# ---------------------------------------------------------------------------------------------------------------
# The paper's setting, estimated from sizes. Every architecture figure is an assumption, stated here.

GB = 1e9
ARCH = {  # a dense 9B decoder; Qwen3.5's exact layout may differ (see benchmarks/README.md)
    "params": 9.0e9, "layers": 32, "hidden": 4096, "kv_heads": 8, "head_dim": 128, "vocab": 248_320,
    "tied": False,
}
SETTING = {"prompts": 96, "rollouts": 8, "gpus": 8, "prompt_tokens": 1_200, "mean_response": 512,
           "max_response": 1_024, "micro_batch": 8, "loss_chunk": 256,
           "gpu_mem": 80 * GB, "hbm_bw": 3.35e12, "bf16_flops": 989e12, "mfu": 0.4, "allgather_bw": 150e9}


def paper_estimate(arch: dict = ARCH, s: dict = SETTING) -> list[tuple[str, float, float]]:
    """(item, GB per GPU FSDP2 + HF generate, GB per GPU FSDP2 + colocated vLLM) and step-time rows."""
    g = s["gpus"]
    head = arch["vocab"] * arch["hidden"]  # the LM head: outside FSDP, replicated (vopd_train/fsdp.py)
    sharded = arch["params"] - head
    seqs = s["prompts"] * s["rollouts"] // g  # sequences per GPU per step
    tokens = seqs * (s["prompt_tokens"] + s["mean_response"])
    micro_tokens = s["micro_batch"] * (s["prompt_tokens"] + s["max_response"])
    kv_per_token = 2 * arch["layers"] * arch["kv_heads"] * arch["head_dim"] * 2  # K and V, bf16
    layer_bf16 = sharded / arch["layers"] * 2
    rows = [
        ("student weights fp32 (sharded) + LM head fp32 (replicated)", sharded * 4 / g + head * 4, None),
        ("gradients fp32 (same split)", sharded * 4 / g + head * 4, None),
        ("AdamW moments fp32 (same split)", sharded * 8 / g + head * 8, None),
        ("EMA teacher fp32 (sharded) + its LM head", sharded * 4 / g + head * 4, None),
        ("all-gathered bf16 layers in flight (current + prefetched, student or teacher)", 2 * layer_bf16, None),
        ("activations, gradient checkpointing: layer inputs of one micro-batch (bf16)",
         micro_tokens * arch["hidden"] * 2 * arch["layers"], None),
        ("one layer recomputed in the backward (≈ 16 × hidden × tokens, bf16)", micro_tokens * arch["hidden"] * 16 * 2, None),
        ("loss chunk: logits and their softmax/grad buffers (fp32, ~6 copies)", s["loss_chunk"] * arch["vocab"] * 4 * 6, None),
    ]
    static = rows[0][1] + rows[2][1] + rows[3][1]  # always resident: weights, moments, teacher
    train = sum(r[1] for r in rows)  # the training phase (gradients are freed between steps)
    hf_kv = seqs * (s["prompt_tokens"] + s["max_response"]) * kv_per_token
    vllm = arch["params"] * 2 + hf_kv  # its own bf16 weights (TP 1) and a KV pool for the rollouts
    out = [(name, v, v) for name, v, _ in rows]
    out.append(("rollout KV cache of the GPU's rollouts at full length (HF: during generate; vLLM: its pool)",
                hf_kv, hf_kv))
    out.append(("vLLM's own full bf16 weights (TP 1, one engine per GPU)", 0.0, arch["params"] * 2))
    out.append(("peak, training phase", train, train + vllm))
    out.append(("peak, rollout phase", static + rows[4][1] + hf_kv, static + vllm))
    out.append(("peak with --vllm-sleep-mode (vLLM's weights and KV released while training)",
                max(train, static + rows[4][1] + hf_kv), max(train, static + vllm)))
    # step time
    flops_student = 6 * arch["params"] * tokens  # forward + backward
    flops_recompute = 2 * arch["params"] * tokens  # gradient checkpointing
    flops_teacher = 2 * arch["params"] * tokens
    t_train = (flops_student + flops_recompute + flops_teacher) / (s["bf16_flops"] * s["mfu"])
    steps = s["max_response"]  # decode steps until the longest rollout ends
    # HF generate on FSDP: each decode step all-gathers every layer (bf16) and reads the weights once
    t_hf = steps * (sharded * 2 / s["allgather_bw"] + arch["params"] * 2 / s["hbm_bw"])
    # vLLM: each decode step reads the weights and the batch's KV once (memory bound at this batch size)
    t_vllm = steps * (arch["params"] * 2 + seqs * (s["prompt_tokens"] + steps / 2) * kv_per_token) / s["hbm_bw"]
    t_sync = sharded * 2 / s["allgather_bw"] + arch["params"] * 2 / s["hbm_bw"]  # gather + load into vLLM
    out.append(("step: train (student fwd+bwd, recompute, teacher fwd) at 40% MFU (s)", t_train, t_train))
    out.append(("step: rollouts (s)", t_hf, t_vllm))
    out.append(("step: weight sync into vLLM (s)", 0.0, t_sync))
    out.append(("step total (s)", t_train + t_hf, t_train + t_vllm + t_sync))
    return out


def print_estimate() -> None:
    print("| per GPU | FSDP2 + HF generate | FSDP2 + colocated vLLM |")
    print("|---|---|---|")
    for name, a, b in paper_estimate():
        unit = 1 if "(s)" in name else GB
        print(f"| {name} | {a / unit:.1f} | {b / unit:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--limit", type=int, default=96, help="gap-report samples of synthetic:test (3 views each)")
    ap.add_argument("--steps", type=int, default=6, help="distill steps of the toy preset")
    ap.add_argument("--estimate-only", action="store_true")
    args = ap.parse_args()
    if not args.estimate_only:
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        with tempfile.TemporaryDirectory() as tmp:
            for mode, unit in (("gap-report", "requests/s"), ("distill", "prompts/s")):
                t0 = time.time()
                one = launch(1, mode, Path(tmp) / f"{mode}-1", args.limit, args.steps)
                many = launch(args.nproc, mode, Path(tmp) / f"{mode}-{args.nproc}", args.limit, args.steps)
                print(f"{mode}: 1 process {one:.2f} {unit}, {args.nproc} processes {many:.2f} {unit}, "
                      f"ratio {many / one:.2f} ({time.time() - t0:.0f} s)")
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    print_estimate()


if __name__ == "__main__":
    main()
