"""Which torch thread count makes the newcomer's first command, `vopd gap-report toy`, fastest on this machine?

Runs the command end to end, each time in a fresh process and into a fresh output folder (nothing resumed), with
`--threads 1` and `--threads 2` alternating (1, 2, 1, 2, …) so that a change in the machine's load hits both
alike. Prints, per run, the wall time measured around the process, its CPU time (user + system, children
included) and the run's own timing line; then the median per thread count, and the load average before and
after, which says whether the machine was quiet enough for the figures to mean anything.

    .venv/bin/python benchmarks/toy_threads.py [--rounds 3] [--threads 1,2] [--limit N] [--json out.json]

On a quiet machine (a load average under 0.5 before the runs; during and after them the runs themselves keep it
near 1) the figures say what a newcomer on an idle machine sees. `--limit` makes a quick check of the script
itself; the figures need the full command (no limit), as a newcomer runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(threads: int, limit: int | None, work: Path) -> dict:
    """`vopd gap-report toy --threads N` in a new process and a new folder; its wall and CPU seconds."""
    out = Path(tempfile.mkdtemp(prefix=f"toy-t{threads}-", dir=work))
    cmd = [sys.executable, "-m", "vopd_bench.cli", "gap-report", "toy", "--threads", str(threads), "--out",
           str(out / "run"), "--quiet"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("OMP_NUM_THREADS", None)  # --threads decides
    cpu0, t0 = _cpu_children(), time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - cpu0
    if res.returncode != 0:
        raise SystemExit(f"threads {threads}: the run failed:\n{res.stderr[-2000:]}")
    line = res.stdout.strip().splitlines()[-1]
    timings = json.loads((out / "run" / "run.json").read_text())["timings"]
    return {"threads": threads, "wall_s": wall, "cpu_s": cpu, "backend_s": timings["backend_seconds"],
            "model_load_s": timings["model_load_seconds"], "line": line}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="runs per thread count")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, run in turn")
    ap.add_argument("--limit", type=int, default=None, help="samples per view (default: the whole toy command)")
    ap.add_argument("--json", type=Path, default=None, help="also write every run and the medians here")
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]

    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="vopd-toy-threads-") as work:
        for i in range(args.rounds):
            for t in counts:
                r = run_once(t, args.limit, Path(work))
                runs.append(r)
                print(f"round {i + 1} threads {t}: wall {r['wall_s']:.1f} s, cpu {r['cpu_s']:.1f} s · {r['line']}",
                      flush=True)
    load_after = os.getloadavg()

    medians = {t: {k: statistics.median(r[k] for r in runs if r["threads"] == t)
                   for k in ("wall_s", "cpu_s", "backend_s")} for t in counts}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; commit {commit}; "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}"
          # the runs themselves keep one to two cores busy, so only the load before them says whether others were
          + ("  (not quiet: other work was running)" if load_before[0] > 0.5 else ""))
    print(f"command: vopd gap-report toy --threads N{f' --limit {args.limit}' if args.limit else ''}, "
          f"{args.rounds} runs each, alternating")
    print("threads | median wall s | median CPU s | median backend s")
    for t, m in medians.items():
        print(f"{t:>7} | {m['wall_s']:>13.1f} | {m['cpu_s']:>12.1f} | {m['backend_s']:>16.1f}")
    best = min(medians, key=lambda t: medians[t]["wall_s"])
    print(f"fastest end to end: --threads {best}")
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "load_before": load_before, "load_after": load_after,
                                         "limit": args.limit, "runs": runs, "medians": medians}, indent=2) + "\n")


if __name__ == "__main__":
    main()
