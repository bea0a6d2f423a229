"""The best checkpoint: which evaluated step wins, and its weights on disk until the run ends.

    OUT/best/
        best.json            {"step", "criterion", "score", "metrics"} of the weights beside it
        student.safetensors  the trainable tensors at that step (with LoRA: the adapter only)
        dcp/                 instead, under torchrun: every rank's shards of them (`dcp_state.save_trainable`)

A later evaluation replaces it only when it scores strictly higher, so among equal scores the earliest step wins
(fewer updates away from the starting model). The folder is replaced atomically; `best.json` always describes
the tensors next to it. The trainer saves its resumable state right after every evaluation, so a run resumed
from any point reads here exactly the best-so-far that an uninterrupted run would hold.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vopd_bench import distributed
from vopd_bench.errors import VopdError

BEST = "best"
# What `--keep-best` can rank by, and how it is explained in config.yaml and on the console.
CRITERIA: dict[str, tuple[Callable[[dict[str, Any]], float], str]] = {
    "mean_full_crop": (lambda m: (m["acc_full"] + m["acc_crop"]) / 2,
                       "the highest mean of full and crop accuracy (progress on full without losing crop)"),
    "full": (lambda m: m["acc_full"], "the highest full-view accuracy"),
}


@dataclass(frozen=True)
class BestRecord:
    step: int
    criterion: str
    score: float
    metrics: dict[str, Any]

    def why(self) -> str:
        return CRITERIA[self.criterion][1]


def best_summary(record: BestRecord) -> dict[str, Any]:
    """What config.yaml records about the winner."""
    m = record.metrics
    return {"step": record.step, "criterion": record.criterion, "why": record.why(), "score": record.score,
            **{k: m.get(k) for k in ("acc_full", "acc_crop", "acc_box", "gap", "n")}}


def score(metrics: dict[str, Any], criterion: str) -> float:
    if criterion not in CRITERIA:
        raise VopdError(f"--keep-best must be one of {', '.join(CRITERIA)} or last, got {criterion!r}")
    return float(CRITERIA[criterion][0](metrics))


def is_better(candidate: float, best: BestRecord | None) -> bool:
    """Strictly higher wins: on a tie the earlier step stays."""
    return best is None or candidate > best.score


def pick_best(evaluations: list[tuple[int, dict[str, Any]]], criterion: str) -> BestRecord | None:
    """The winner of a whole sequence of (step, metrics), as `BestKeeper.offer` would find it one at a time."""
    best = None
    for step, metrics in evaluations:
        s = score(metrics, criterion)
        if is_better(s, best):
            best = BestRecord(step, criterion, s, dict(metrics))
    return best


class BestKeeper:
    """The best-so-far record and its weights in OUT/best."""

    def __init__(self, out: Path, criterion: str):
        score({"acc_full": 0.0, "acc_crop": 0.0}, criterion)  # reject an unknown criterion up front
        self.dir, self.criterion = out / BEST, criterion
        self.best: BestRecord | None = None

    def clear(self) -> None:
        """A fresh run: forget a best left by an earlier run in the same folder."""
        if distributed.rank() == 0:
            for p in (self.dir, self.dir.with_name(BEST + ".tmp")):
                if p.exists():
                    shutil.rmtree(p)
        distributed.barrier()
        self.best = None

    def load(self) -> None:
        """A resumed run: the best-so-far on disk (none if no evaluation has won yet)."""
        path, tmp = self.dir / "best.json", self.dir.with_name(BEST + ".tmp")
        if distributed.rank() == 0 and not path.is_file() and (tmp / "best.json").is_file():
            tmp.rename(self.dir)  # killed between the two renames of `offer`
        distributed.barrier()
        if not path.is_file():
            self.best = None
            return
        body = json.loads(path.read_text(encoding="utf-8"))
        if body["criterion"] != self.criterion:
            raise VopdError(f"{self.dir} ranks by {body['criterion']}, not {self.criterion}; pass the same "
                            "--keep-best to resume, or --restart")
        self.best = BestRecord(**body)

    def offer(self, step: int, metrics: dict[str, Any], tensors: Callable[[], dict[str, torch.Tensor]] | None = None,
              *, write: Callable[[Path], None] | None = None) -> bool:
        """Keep the weights if this evaluation beats the best so far: `tensors()` (called only when needed) saved
        as student.safetensors, or, under torchrun, `write(folder)`, which every rank calls (each writes its
        shards). Every rank of a torchrun job calls `offer` with the same metrics; rank 0 moves the folders."""
        s = score(metrics, self.criterion)
        if not is_better(s, self.best):
            return False
        record = BestRecord(step, self.criterion, s, dict(metrics))
        main = distributed.rank() == 0
        tmp = self.dir.with_name(BEST + ".tmp")
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        distributed.barrier()
        if write is not None:
            write(tmp)
        elif main and tensors is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors().items()}, tmp / "student.safetensors")
        distributed.barrier()
        if main:
            (tmp / "best.json").write_text(json.dumps(asdict(record), indent=1), encoding="utf-8")
            if self.dir.exists():
                shutil.rmtree(self.dir)
            tmp.rename(self.dir)
        distributed.barrier()
        self.best = record
        return True

    def tensors(self) -> dict[str, torch.Tensor]:
        """The kept weights as full tensors (saved by one process)."""
        return load_file(self.dir / "student.safetensors")

    def sharded(self) -> bool:
        """Whether the kept weights are a torchrun run's shards (`write`) rather than student.safetensors."""
        return not (self.dir / "student.safetensors").is_file()
