"""One line of samples.jsonl: the answer of one model to one sample under one view, scored.

This is the contract between the harness (which writes records) and everything downstream (analysis, reports,
leaderboards, the trainer's failure hand-off).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

ErrorKind = Literal["sample", "backend"]


@dataclass
class Record:
    key: str  # covers model fingerprint, generation settings, benchmark, sample, view, view config and prompt
    benchmark: str  # e.g. "synthetic", "vstar", "local:mydata"
    sample_id: str
    view: str  # "full" | "crop" | "box" | "selfcrop"
    category: str | None = None
    question: str | None = None
    options: list[str] = field(default_factory=list)
    answer: str | None = None
    answer_type: str | None = None
    prompt: str | None = None  # the exact text sent (without the image)
    response: str | None = None  # raw model output
    parsed: str | None = None  # what the rules extracted; None = parse failure (or error)
    correct: bool | None = None  # None only when `error` is set
    parse_failed: bool = False
    error: str | None = None
    error_kind: ErrorKind | None = None  # "sample": bad data, permanent; "backend": transient, retried on rerun
    image: str | None = None  # a path to the source image when there is one
    boxes: list[list[float]] = field(default_factory=list)  # evidence boxes, xyxy, clamped to the image
    boxes_clamped: int = 0  # how many boxes had to be clamped
    evidence_area: float | None = None  # union box area / image area
    image_size: list[int] | None = None  # [width, height] of the source image
    model: str | None = None  # model fingerprint
    seconds: float = 0.0  # backend time attributed to this request
    meta: dict[str, Any] = field(default_factory=dict)  # benchmark-specific fields for its own metrics
    focus: dict[str, float] | None = None  # --focus: attention ratio per layer band (vopd_bench.focus)
    window: list[int] | None = None  # selfcrop view: the region the model's attention chose, source pixels

    def to_json(self) -> str:
        # Every field already holds JSON types; vars() avoids asdict's deep copy (5x slower on big metadata).
        return json.dumps(vars(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def record_key(*, model: str, generation: dict, benchmark: str, sample_id: str, view: str, view_config: dict,
               prompt: str) -> str:
    payload = json.dumps(
        {"model": model, "gen": generation, "benchmark": benchmark, "sample": sample_id, "view": view,
         "view_config": view_config if view != "full" else {}, "prompt": prompt},
        sort_keys=True, ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]
