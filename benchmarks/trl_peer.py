"""`vopd distill` against TRL's `DistillationTrainer` on the same work, in fresh processes, alternating.

The work (both sides): the toy model, the same 32 prompts per step in the same order (their prompt token ids are
compared, step by step), at most 4 new tokens at temperature 1, LoRA r 16 / alpha 32 on all linear layers (the
trainable parameter counts are printed), the full-vocabulary generalised JSD with β = 0.5 averaged per token,
AdamW at lr 1e-3 (no warm-up, weight decay 0.01, clip 1.0), float32, one torch thread, no evaluation, a resumable
state written at the end. Then n = 8 samples per prompt: vopd draws 8 per prompt, TRL is given every prompt 8
times (its only way); both score 256 responses a step, so the step ratio is the per-response ratio.

The one difference in the work: TRL's teacher reads the student's own inputs (the full image), vopd's reads the
evidence crop with the same text (docs/results/trl-peer.md says why the timing is still like for like).

Per run: the median step after the first (wall and CPU), the training seconds (the trainer's train call) and the
wall (process start to end, so imports, model and data loading count). TRL runs in its own venv, built once
outside the checkout by `trl_peer_setup.py` with the torch, transformers and peft of the interpreter that runs
this script. The last line:

    n=1 step ratio vopd/TRL: X  n=8 per-response ratio: Y  wall ratio: Z

    python benchmarks/trl_peer.py [--quick] [--steps 30] [--steps-n8 10] [--pairs 2] [--cpu] [--venv-root DIR]

`--quick` is a smoke test (3 steps, one pair). `--cpu` puts CPU-time ratios on the last line (for a loaded
machine); wall-clock ratios are the measure on a quiet one.
"""

from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BATCH = 32
MAX_NEW = 4
SEED = 0


# ------------------------------------------------------------------ the vopd child


def vopd_child(args: argparse.Namespace) -> None:
    """`vopd distill toy` through the command line's own entry point, with clocks on its progress display."""
    import yaml

    from vopd_train import cli as distill_cli
    from vopd_train.rollout import HFRolloutEngine

    config = {"data": args.data, "steps": args.steps, "batch_size": BATCH, "n_rollouts": args.n,
              "micro_batch_size": BATCH * args.n, "max_new_tokens": MAX_NEW, "temperature": 1.0, "lora": True,
              "lora_rank": 16, "lora_alpha": 32, "lora_targets": "all-linear", "teacher": "frozen", "topk": 0,
              "alpha": 0.5, "reduction": "token-mean", "lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.01,
              "grad_clip": 1.0, "dtype": "float32", "threads": 1, "eval_every": None, "remeasure": False,
              "quiet": True, "seed": SEED,
              "crop_anchor": 0.0}  # the toy preset's crop anchor is a second loss TRL does not compute: off
    yaml_path = Path(args.out) / "bench.yaml"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(yaml.safe_dump(config), encoding="utf-8")

    stamps: list[tuple[float, float]] = []
    hashes: list[str] = []
    trainable: list[int] = []
    end: list[float] = []
    begin: list[float] = []
    display = distill_cli._Display
    start, update, stop = display.start, display.update, display.stop

    def on_start(self, done, total):
        begin.append(time.time())
        stamps.append((time.perf_counter(), time.process_time()))
        return start(self, done, total)

    def on_update(self, s):
        stamps.append((time.perf_counter(), time.process_time()))
        return update(self, s)

    def on_stop(self):
        end.append(time.perf_counter())
        return stop(self)

    generate = HFRolloutEngine.generate

    def recording(self, prompts, settings):
        if not trainable:
            trainable.append(sum(p.numel() for p in self.model.parameters() if p.requires_grad))
        ids = [p.input_ids.tolist() for p in prompts]
        hashes.append(hashlib.sha256(json.dumps(ids).encode()).hexdigest())
        return generate(self, prompts, settings)

    display.start, display.update, display.stop = on_start, on_update, on_stop
    HFRolloutEngine.generate = recording
    from vopd_bench.cli import main  # the `vopd` command, as a user runs it

    sys.argv = ["vopd", "distill", "toy", "--config", str(yaml_path), "--out", str(Path(args.out) / "run")]
    try:
        main()
    except SystemExit as e:
        if e.code:
            raise
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:], strict=False)]
    import torch

    Path(args.result).write_text(json.dumps({
        "side": "vopd", "step_wall": [s[0] for s in steps], "step_cpu": [s[1] for s in steps],
        "train_seconds": end[0] - stamps[0][0], "train_begin": begin[0],
        "trainable": trainable[0], "prompt_hashes": hashes, "responses_per_step": BATCH * args.n,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "process_cpu": time.process_time(),
    }), encoding="utf-8")


# ------------------------------------------------------------------ the parent


def build_data(folder: Path, n_prompts: int) -> None:
    """`n_prompts` prompts of `synthetic:train` as a Vision-OPD-6K folder: the full image, the evidence crop (as
    vopd renders it) and the text, as PNG files and train.jsonl. Both trainers read these same files."""
    from vopd_train.data import load_prompts

    (folder / "images").mkdir(parents=True, exist_ok=True)
    prompts = load_prompts("synthetic:train", limit=n_prompts).prompts
    with (folder / "train.jsonl").open("w", encoding="utf-8") as f:
        for k, prompt in enumerate(prompts):
            r = prompt.render()
            full, crop = f"images/{k:05d}-full.png", f"images/{k:05d}-crop.png"
            r.student_image.save(folder / full)
            r.teacher_image.save(folder / crop)
            f.write(json.dumps({"id": k, "images": [full], "teacher_images": [crop], "problem": "<image>" + r.text})
                    + "\n")


def step_order(n_prompts: int, steps: int) -> list[int]:
    """The data rows of every step, in order, exactly as `vopd distill` draws them (seeded epochs)."""
    from vopd_train.data import batch_indices

    return [i for s in range(steps) for i in batch_indices(n_prompts, BATCH, s, SEED)]


def run_child(side: str, python: str, data: Path, order: Path, steps: int, n: int, work: Path) -> dict:
    out, result = work / f"{side}-out", work / f"{side}.json"
    if side == "vopd":
        cmd = [python, str(Path(__file__).resolve()), "--child-vopd", "--data", str(data), "--steps", str(steps),
               "--n", str(n), "--out", str(out), "--result", str(result)]
    else:
        cmd = [python, str(HERE / "trl_peer_child.py"), "--model", str(ROOT / "vopd_bench" / "toy" / "model"),
               "--data", str(data), "--order", str(order), "--steps", str(steps), "--batch", str(BATCH),
               "--n", str(n), "--max-new-tokens", str(MAX_NEW), "--seed", str(SEED), "--out", str(out),
               "--result", str(result)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT) if side == "vopd" else ""}
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the {side} run failed (exit {proc.returncode})")
    r = json.loads(result.read_text(encoding="utf-8"))
    r.update(wall=wall, load=load, load_after=os.getloadavg()[0], startup=r["train_begin"] - t0)
    return r


def summarize(runs: list[dict]) -> dict:
    med = lambda key: statistics.mean(statistics.median(r[key][1:]) for r in runs)  # noqa: E731
    return {"step": med("step_wall"), "step_cpu": med("step_cpu"),
            "train": statistics.mean(r["train_seconds"] for r in runs),
            "wall": statistics.mean(r["wall"] for r in runs),
            "startup": statistics.mean(r["startup"] for r in runs),
            "load": statistics.mean((r["load"] + r["load_after"]) / 2 for r in runs)}


def compare(name: str, n: int, steps: int, pairs: int, trl_python: str, data: Path, n_prompts: int,
            work: Path) -> dict:
    order = work / f"order-{name}.json"
    order.write_text(json.dumps(step_order(n_prompts, steps)), encoding="utf-8")
    runs: dict[str, list[dict]] = {"vopd": [], "trl": []}
    for pair in range(pairs):
        for side in (("vopd", "trl") if pair % 2 == 0 else ("trl", "vopd")):
            python = sys.executable if side == "vopd" else trl_python
            r = run_child(side, python, data, order, steps, n, work / f"{name}-{pair}")
            runs[side].append(r)
            print(f"  {name} pair {pair + 1} {side:4s}: median step {statistics.median(r['step_wall'][1:]):.3f} s "
                  f"(CPU {statistics.median(r['step_cpu'][1:]):.3f} s), training {r['train_seconds']:.1f} s, "
                  f"wall {r['wall']:.1f} s, load {r['load']:.1f}", flush=True)
    v, t = runs["vopd"][0], runs["trl"][0]
    same = all(a["prompt_hashes"] == t["prompt_hashes"] for a in runs["vopd"] + runs["trl"])
    if not same or len(v["prompt_hashes"]) != steps:
        raise SystemExit(f"{name}: the two trainers did not see the same prompt token ids step by step")
    if v["trainable"] != t["trainable"]:
        raise SystemExit(f"{name}: trainable parameters differ (vopd {v['trainable']:,}, TRL {t['trainable']:,})")
    sv, st = summarize(runs["vopd"]), summarize(runs["trl"])
    print(f"\n{name}: {steps} steps × {BATCH} prompts × n={n} ({BATCH * n} responses a step), {pairs} pair(s); "
          f"prompt token ids identical in all {steps} steps; trainable parameters {v['trainable']:,} on both sides")
    print(f"  {'':34s} {'vopd':>9s} {'TRL':>9s} {'vopd/TRL':>9s}")
    rows = [("median step, wall (after the first)", "step", "s"), ("median step, CPU", "step_cpu", "s"),
            ("training seconds", "train", "s"), ("start-up (process start to training)", "startup", "s"),
            ("wall, process start to end", "wall", "s")]
    for label, key, unit in rows:
        print(f"  {label:34s} {sv[key]:8.3f}{unit} {st[key]:8.3f}{unit} {sv[key] / st[key]:9.2f}")
    print(f"  {'per response, median step':34s} {1000 * sv['step'] / (BATCH * n):7.2f}ms "
          f"{1000 * st['step'] / (BATCH * n):7.2f}ms {sv['step'] / st['step']:9.2f}")
    print(f"  load average during the runs: vopd {sv['load']:.1f}, TRL {st['load']:.1f}")
    return {"vopd": sv, "trl": st}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="steps of the n=1 comparison")
    ap.add_argument("--steps-n8", type=int, default=10, help="steps of the n=8 comparison")
    ap.add_argument("--pairs", type=int, default=2, help="pairs of fresh processes per comparison, alternating")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 steps each, one pair")
    ap.add_argument("--cpu", action="store_true", help="CPU-time ratios on the last line (for a loaded machine)")
    ap.add_argument("--skip-n8", action="store_true")
    ap.add_argument("--venv-root", type=Path, default=None, help="where the TRL venv lives (trl_peer_setup.py)")
    ap.add_argument("--child-vopd", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_vopd:
        return vopd_child(args)
    if args.quick:
        args.steps, args.steps_n8, args.pairs = 3, 3, 1

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from trl_peer_setup import ensure

    trl_python = str(ensure(args.venv_root))
    import torch
    import transformers

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; torch "
          f"{torch.__version__}, transformers {transformers.__version__} (both sides); TRL venv {trl_python}")
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    n_prompts = BATCH * max(args.steps, 0 if args.skip_n8 else args.steps_n8)
    with tempfile.TemporaryDirectory(prefix="vopd-trl-peer-") as tmp:
        work = Path(tmp)
        build_data(work / "data", n_prompts)
        results = {"n=1": compare("n=1", 1, args.steps, args.pairs, trl_python, work / "data", n_prompts, work)}
        if not args.skip_n8:
            results["n=8"] = compare("n=8", 8, args.steps_n8, args.pairs, trl_python, work / "data", n_prompts, work)
    key = "step_cpu" if args.cpu else "step"
    x = results["n=1"]["vopd"][key] / results["n=1"]["trl"][key]
    y = results["n=8"]["vopd"][key] / results["n=8"]["trl"][key] if "n=8" in results else float("nan")
    z = results["n=1"]["vopd"]["wall"] / results["n=1"]["trl"]["wall"]
    print(f"\n({'CPU-time' if args.cpu else 'wall-clock'} step ratios; {time.time() - T_START:.0f} s in all)")
    print(f"n=1 step ratio vopd/TRL: {x:.2f}  n=8 per-response ratio: {y:.2f}  wall ratio: {z:.2f}")


if __name__ == "__main__":
    main()
