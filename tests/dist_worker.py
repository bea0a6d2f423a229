"""Run by torchrun from test_distributed.py: one rank of a gap-report or distill job, with test hooks.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/dist_worker.py MODE CONFIG_JSON

MODE `gap-report`: `run_gap_report(GapReportConfig(**config))`; with "kill_rank" and "kill_after" in the config,
that rank SIGKILLs itself after that many batches. MODE `distill`: `Distiller(DistillConfig(**config)).train()`;
with "seed_engine": true, rollouts come from `SeedEngine`.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from vopd_train.rollout import Rollout


class SeedEngine:
    """Deterministic rollouts that depend only on each prompt's own seed, never on its rank or batch neighbours:
    rollout j of a prompt is 1–3 tokens drawn from its seed."""

    def generate(self, prompts, settings):
        out = []
        for i, seed in enumerate(settings.prompt_seeds):
            for j in range(settings.n):
                h = (seed * 31 + j * 7) % 1009
                out.append(Rollout(i, [40 + h % 7, 50 + h % 5, 60 + h % 3][: 1 + h % 3]))
        return out

    def sync_weights(self, model):
        return None


def main() -> None:
    mode, config = sys.argv[1], json.loads(sys.argv[2])
    if mode == "gap-report":
        from vopd_bench.runner import GapReportConfig, run_gap_report

        kill_rank, kill_after = config.pop("kill_rank", None), config.pop("kill_after", None)

        def on_batch(n: int) -> None:
            if int(os.environ.get("RANK", "0")) == kill_rank and n >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        run_gap_report(GapReportConfig(**config), on_batch=on_batch)
    elif mode == "distill":
        from vopd_train.config import DistillConfig
        from vopd_train.trainer import Distiller

        engine = SeedEngine() if config.pop("seed_engine", False) else None
        Distiller(DistillConfig(**config), engine=engine).train()
    else:
        raise SystemExit(f"unknown mode {mode}")
    from vopd_bench import distributed

    distributed.shutdown()


if __name__ == "__main__":
    main()
