"""The data model: one benchmark question and the evidence that answers it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from vopd_bench.geometry import Box
from vopd_bench.images import ImageSource

AnswerType = Literal["mcq", "yesno", "short", "number"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Sample:
    """One question. `boxes` are xyxy pixels in the image's own coordinates (zero or more)."""

    id: str
    image: ImageSource
    question: str
    options: tuple[str, ...] = ()
    answer: str | None = None  # a letter when `options` is non-empty
    answer_type: AnswerType = "mcq"
    boxes: tuple[Box, ...] = ()
    category: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    crop_image: ImageSource | None = None  # a benchmark-provided crop (ZoomBench) overrides the computed one

    @property
    def has_evidence(self) -> bool:
        return bool(self.boxes) or self.crop_image is not None

    def option_letter(self, i: int) -> str:
        return LETTERS[i]


@dataclass(frozen=True)
class BadSample:
    """A row that could not become a Sample. It is recorded with its reason, never dropped silently."""

    id: str
    error: str
    category: str | None = None
