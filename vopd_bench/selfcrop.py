"""The `selfcrop` view: a training-free zoom chosen by the model's own attention.

For one image and question:
1. Two prefill-only passes (no generation): the question, and a generic description prompt on the same image.
   Each gives the head-mean attention from the last prompt position to the image tokens, averaged over the
   middle third of the LM's attention layers.
2. Relative attention = question map / generic map, both normalised to sum 1 first. Dividing by the generic
   map removes the tokens that draw attention whatever is asked (attention sinks). `EPS` keeps a cell that
   the generic prompt ignores from dominating through a division by almost zero.
3. Square windows of a few sizes (`WINDOW_FRACTIONS` of the grid's shorter side, in whole cells) slide over
   the map one cell at a time. For each size, the window with the largest relative-attention sum is its
   candidate, and the size whose candidate stands out most sharply above the other windows of that size
   (maximum / mean of all window sums) wins; ties go to the smaller window.
4. The window is cropped and resized with the crop view's zoom, and the question is asked again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vopd_bench import geometry, views
from vopd_bench.attention import DEFAULT_BAND, ImageAttention
from vopd_bench.backends.base import GenerationConfig, Request
from vopd_bench.geometry import Box
from vopd_bench.views import ViewConfig

GENERIC_PROMPT = "Write a general description of the image."
WINDOW_FRACTIONS = (0.25, 0.375, 0.5)
EPS = 0.01  # in units of the uniform share 1 / n_tokens


@dataclass(frozen=True)
class Window:
    """The chosen window: its cells on the token grid and its pixels in the image."""

    row: int
    col: int
    side: int  # in cells
    sharpness: float
    box: Box  # (x1, y1, x2, y2) in image pixels


def settings() -> dict:
    """What decides the window; part of every selfcrop record's key."""
    return {"generic_prompt": GENERIC_PROMPT, "window_fractions": list(WINDOW_FRACTIONS), "eps": EPS,
            "band": DEFAULT_BAND}


def relative_attention(question_map: np.ndarray, generic_map: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Question attention over generic attention, each normalised to sum 1, with `eps / n` added below."""
    q = question_map / question_map.sum()
    g = generic_map / generic_map.sum()
    return q / (g + eps / g.size)


def window_sides(grid: tuple[int, int], fractions: Sequence[float] = WINDOW_FRACTIONS) -> list[int]:
    short = min(grid)
    return sorted({min(short, max(1, round(f * short))) for f in fractions})


def window_sums(rel: np.ndarray, side: int) -> np.ndarray:
    """Sum of `rel` over every side × side window, indexed by the window's top-left cell."""
    c = np.pad(rel.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return c[side:, side:] - c[:-side, side:] - c[side:, :-side] + c[:-side, :-side]


def choose_window(rel: np.ndarray, image_size: tuple[int, int],
                  fractions: Sequence[float] = WINDOW_FRACTIONS) -> Window:
    """The sharpest maximum over window sizes (see the module docstring); first in raster order on ties."""
    best: tuple[float, int, int, int] | None = None
    for side in window_sides(rel.shape, fractions):
        sums = window_sums(rel, side)
        r, c = np.unravel_index(int(np.argmax(sums)), sums.shape)
        sharp = float(sums[r, c] / sums.mean())
        if best is None or sharp > best[0]:
            best = (sharp, side, int(r), int(c))
    assert best is not None
    sharp, side, r, c = best
    rows, cols = rel.shape
    w, h = image_size
    box = (c * w / cols, r * h / rows, (c + side) * w / cols, (r + side) * h / rows)
    return Window(r, c, side, sharp, box)


def window_of(question: ImageAttention, generic: ImageAttention) -> Window:
    rel = relative_attention(question.band(DEFAULT_BAND), generic.band(DEFAULT_BAND))
    return choose_window(rel, question.image_size)


def crop_window(image: Image.Image, window: Box, cfg: ViewConfig) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The window as the crop view would show it: tight (context 1), at least `min_side`, zoomed."""
    return views.crop_view(image, [window], ViewConfig(context=1.0, min_side=cfg.min_side, zoom=cfg.zoom))


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = geometry.area(a) + geometry.area(b) - inter
    return inter / union if union > 0 else 0.0


def hit(window: Box, boxes: Sequence[Box]) -> bool:
    """Whether the centre of the evidence (the union of its boxes, as the crop view uses) lies in the window."""
    x1, y1, x2, y2 = geometry.union(boxes)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return window[0] <= cx <= window[2] and window[1] <= cy <= window[3]


def locate(backend: Any, items: Sequence[tuple[str, Image.Image]], gen: GenerationConfig) -> list[Window | str]:
    """The window of each (prompt, image), or the reason it could not be chosen: two prefill-only passes."""
    asked = backend.prefill_attention([Request(f"q{i}", img, prompt) for i, (prompt, img) in enumerate(items)], gen)
    generic = backend.prefill_attention([Request(f"g{i}", img, GENERIC_PROMPT) for i, (_, img) in enumerate(items)],
                                        gen)
    out: list[Window | str] = []
    for q, g in zip(asked, generic, strict=True):
        bad = next((x for x in (q, g) if isinstance(x, str)), None)
        out.append(bad if bad is not None else window_of(q, g))
    return out
