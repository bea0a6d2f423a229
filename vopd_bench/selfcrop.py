"""The `selfcrop` view: a training-free zoom chosen by the model's own attention, by one of two methods.

Both start the same way: two prefill-only passes (no generation) over the full image, one with the question and
one with a generic description prompt, give the head-mean attention from the last prompt position to the image
tokens. Relative attention = question map / generic map removes the tokens that draw attention whatever is asked
(attention sinks). A window is chosen on that map, and the question is asked again. Then:

`paper`, the method of *MLLMs Know Where to Look* (ICLR 2025) as its official code does it:
1. One LM layer (`vopd_bench.attention.resolve_layer`: the family's default depth, or `--focus-layer`).
2. The generic prompt carries the same format text as the question (`generic_prompt`), so the two prompts differ
   only by the question sentence. The maps are divided as they are (no normalisation, no floor).
3. Windows of absolute sizes: `native_side` × {1, 1.2, 1.4, 1.6, 1.8, 2} pixels of the source image (224 px
   for Qwen-VL, the family's native input), in whole cells (at least one). For each size the window with the
   largest relative-attention sum is its candidate, scored (its sum − the mean sum of the up to 4 windows one
   cell left, right, above and below) / its area in cells; the best score wins, ties to the smaller size. A size
   whose window covers the whole map is not tried; when the smallest one does, the window is the whole image.
4. The crop is a square of the winning size in pixels, centred on the window, moved inside the image; the model
   is asked with the full image AND the crop (two images, as the official code does), the crop unzoomed (the
   processor sizes it as any image).

`grid`, vopd's earlier method (kept for comparison; it is not the paper's):
1. The mean map of the middle third of the LM's attention layers; the bare generic sentence.
2. Each map normalised to sum 1, `EPS` of the uniform share added to the generic one before dividing.
3. Square windows of ¼, ⅜ and ½ of the grid's shorter side; per size the maximum-sum window, scored by its sum /
   the mean sum of all windows of that size; the best score wins, ties to the smaller window.
4. The window alone is cropped and zoomed as the crop view, and asked.

Maps that are zero, negative or non-finite are a per-sample error (`attention.check_map`), never a window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vopd_bench import geometry, views
from vopd_bench.attention import DEFAULT_BAND, BadAttention, ImageAttention, check_map
from vopd_bench.backends.base import GenerationConfig, Request
from vopd_bench.geometry import Box
from vopd_bench.views import ViewConfig

METHODS = ("paper", "grid")
DEFAULT_METHOD = "paper"
GENERIC_PROMPT = "Write a general description of the image."
PAPER_RATIOS = (1.0, 1.2, 1.4, 1.6, 1.8, 2.0)
WINDOW_FRACTIONS = (0.25, 0.375, 0.5)  # grid
EPS = 0.01  # grid: in units of the uniform share 1 / n_tokens


@dataclass(frozen=True)
class SelfCrop:
    """How the window is chosen: the method and, for `paper`, the layer read and the base window side."""

    method: str = DEFAULT_METHOD
    layer: int | None = None  # paper: the LM layer (layer_idx)
    native_side: int | None = None  # paper: base window side in source pixels

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown selfcrop method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method == "paper" and (self.layer is None or not self.native_side or self.native_side < 1):
            raise ValueError("the paper method needs a layer and a positive native side")

    @property
    def two_images(self) -> bool:
        """The answer is asked with the full image and the crop (paper) or the crop alone (grid)."""
        return self.method == "paper"

    def settings(self) -> dict:
        """What decides the window and what the model is shown; part of every selfcrop record's key."""
        if self.method == "paper":
            return {"method": "paper", "generic_prompt": GENERIC_PROMPT + " (with the question's format text)",
                    "layer": self.layer, "native_side": self.native_side, "ratios": list(PAPER_RATIOS),
                    "shown": "full image + crop"}
        return {"generic_prompt": GENERIC_PROMPT, "window_fractions": list(WINDOW_FRACTIONS), "eps": EPS,
                "band": DEFAULT_BAND}


@dataclass(frozen=True)
class Window:
    """The chosen window: its top-left cell, its size in cells, its score, and its pixels in the image."""

    row: int
    col: int
    cells: tuple[int, int]  # (rows, cols)
    score: float
    box: Box  # (x1, y1, x2, y2) in image pixels


def generic_prompt(render: Any, options: Sequence[str], method: str) -> str:
    """The generic prompt of a method: `render(question, options)` is the benchmark's prompt template, which the
    paper's method applies to the generic sentence too, options and answer format included."""
    return render(GENERIC_PROMPT, tuple(options)) if method == "paper" else GENERIC_PROMPT


# ---- the maps ----------------------------------------------------------------------------------------------


def relative_attention(question_map: np.ndarray, generic_map: np.ndarray, eps: float = EPS) -> np.ndarray:
    """grid: question attention over generic attention, each normalised to sum 1, with `eps / n` added below."""
    q = check_map(question_map, "question's attention map")
    g = check_map(generic_map, "generic prompt's attention map")
    q, g = q / q.sum(), g / g.sum()
    return q / (g + eps / g.size)


def paper_relative_attention(question_map: np.ndarray, generic_map: np.ndarray) -> np.ndarray:
    """paper: the question's map divided by the generic prompt's, as they are. A generic map that is 0 on some
    image token leaves the ratio undefined there: BadAttention."""
    q = check_map(question_map, "question's attention map")
    g = check_map(generic_map, "generic prompt's attention map")
    if (g == 0).any():
        raise BadAttention(f"the generic prompt's attention is 0 on {int((g == 0).sum())} image token(s): "
                           "relative attention is undefined there")
    return q / g


def window_sums(rel: np.ndarray, rows: int, cols: int | None = None) -> np.ndarray:
    """Sum of `rel` over every rows × cols window (square when `cols` is None), indexed by its top-left cell."""
    cols = rows if cols is None else cols
    c = np.pad(rel.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return c[rows:, cols:] - c[:-rows, cols:] - c[rows:, :-cols] + c[:-rows, :-cols]


# ---- grid --------------------------------------------------------------------------------------------------


def window_sides(grid: tuple[int, int], fractions: Sequence[float] = WINDOW_FRACTIONS) -> list[int]:
    short = min(grid)
    return sorted({min(short, max(1, round(f * short))) for f in fractions})


def choose_window(rel: np.ndarray, image_size: tuple[int, int],
                  fractions: Sequence[float] = WINDOW_FRACTIONS) -> Window:
    """grid: the sharpest maximum over window sizes (see the module docstring); first in raster order on ties."""
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
    return Window(r, c, (side, side), sharp, box)


# ---- paper -------------------------------------------------------------------------------------------------


def neighbour_score(sums: np.ndarray, row: int, col: int, cells: int) -> float:
    """(the window's sum − the mean sum of the windows one cell left, right, above and below that exist) / its
    area in cells. At least one neighbour exists whenever the window does not cover the whole map."""
    around = [sums[r, c] for r, c in ((row, col - 1), (row, col + 1), (row - 1, col), (row + 1, col))
              if 0 <= r < sums.shape[0] and 0 <= c < sums.shape[1]]
    return float((sums[row, col] - np.mean(around)) / cells)


def paper_window(rel: np.ndarray, image_size: tuple[int, int], native_side: int,
                 ratios: Sequence[float] = PAPER_RATIOS) -> Window:
    """paper: the window of the best-scored size (module docstring, step 3) and its crop box (step 4)."""
    rows, cols = rel.shape
    w, h = image_size
    cw, ch = w / cols, h / rows  # source pixels per cell
    best: tuple[float, float, int, int, int, int] | None = None  # score, ratio, row, col, rows, cols
    for i, ratio in enumerate(ratios):
        kx = min(cols, max(1, int(native_side * ratio / cw)))
        ky = min(rows, max(1, int(native_side * ratio / ch)))
        if kx == cols and ky == rows:  # this size, and every larger one, covers the whole map
            if i == 0:
                return Window(0, 0, (rows, cols), math.nan, (0.0, 0.0, float(w), float(h)))
            break
        sums = window_sums(rel, ky, kx)
        # the first maximum scanning column by column (leftmost, then topmost), as the official code scans
        x, y = divmod(int(np.argmax(sums.T)), sums.shape[0])
        score = neighbour_score(sums, y, x, kx * ky)
        if best is None or score > best[0]:
            best = (score, ratio, y, x, ky, kx)
    assert best is not None
    score, ratio, r, c, ky, kx = best
    side = native_side * ratio
    half = side // 2
    # the window's centre, in whole pixels, moved so that the crop stays inside the image
    xc = min(max(int(c * cw + cw * kx / 2), half), w - half)
    yc = min(max(int(r * ch + ch * ky / 2), half), h - half)
    box = (max(0.0, xc - half), max(0.0, yc - half), min(float(w), xc + half), min(float(h), yc + half))
    return Window(r, c, (ky, kx), score, tuple(float(v) for v in box))


# ---- choosing and cutting ----------------------------------------------------------------------------------


def window_of(question: ImageAttention, generic: ImageAttention, cfg: SelfCrop) -> Window:
    """The window of one image; BadAttention when a map cannot be used."""
    if cfg.method == "paper":
        assert cfg.layer is not None and cfg.native_side is not None
        rel = paper_relative_attention(question.layer(cfg.layer), generic.layer(cfg.layer))
        return paper_window(rel, question.image_size, cfg.native_side)
    rel = relative_attention(question.band(DEFAULT_BAND), generic.band(DEFAULT_BAND))
    return choose_window(rel, question.image_size)


def crop_window(image: Image.Image, window: Box, cfg: ViewConfig) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """grid: the window as the crop view would show it: tight (context 1), at least `min_side`, zoomed."""
    return views.crop_view(image, [window], ViewConfig(context=1.0, min_side=cfg.min_side, zoom=cfg.zoom))


def shown_images(image: Image.Image, window: Window, cfg: SelfCrop,
                 view_config: ViewConfig) -> tuple[tuple[Image.Image, ...], tuple[int, int, int, int]]:
    """What the answer pass is shown, and the region cut (source pixels): paper, the full image then the crop
    as it is; grid, the zoomed crop alone."""
    if cfg.two_images:
        region = tuple(int(round(v)) for v in window.box)
        return (image, image.crop(region)), region  # type: ignore[return-value]
    crop, region = crop_window(image, window.box, view_config)
    return (crop,), region


def locate(backend: Any, items: Sequence[tuple[str, str, Image.Image]], gen: GenerationConfig,
           cfg: SelfCrop) -> list[Window | str]:
    """The window of each (question prompt, generic prompt, image), or the reason it could not be chosen: two
    prefill-only passes."""
    asked = backend.prefill_attention([Request(f"q{i}", img, q) for i, (q, _, img) in enumerate(items)], gen)
    generic = backend.prefill_attention([Request(f"g{i}", img, g) for i, (_, g, img) in enumerate(items)], gen)
    out: list[Window | str] = []
    for q, g in zip(asked, generic, strict=True):
        bad = next((x for x in (q, g) if isinstance(x, str)), None)
        if bad is not None:
            out.append(bad)
            continue
        try:
            out.append(window_of(q, g, cfg))
        except BadAttention as e:
            out.append(f"no self-zoom window: {e}")
    return out


# ---- window vs evidence ------------------------------------------------------------------------------------


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


def _disjoint_pieces(boxes: Sequence[Box]) -> list[Box]:
    """The union of the boxes as disjoint rectangles (cells of the grid their edges make that lie in a box)."""
    xs = sorted({v for b in boxes for v in (b[0], b[2])})
    ys = sorted({v for b in boxes for v in (b[1], b[3])})
    out = []
    for x0, x1 in zip(xs[:-1], xs[1:], strict=True):
        for y0, y1 in zip(ys[:-1], ys[1:], strict=True):
            if any(b[0] <= x0 and x1 <= b[2] and b[1] <= y0 and y1 <= b[3] for b in boxes):
                out.append((x0, y0, x1, y1))
    return out


def coverage(window: Box, boxes: Sequence[Box]) -> float:
    """The share of the evidence (the union of its boxes, overlaps counted once) that lies inside the window."""
    pieces = _disjoint_pieces(boxes)
    total = sum(geometry.area(p) for p in pieces)
    inside = sum(geometry.area((max(p[0], window[0]), max(p[1], window[1]), min(p[2], window[2]),
                                min(p[3], window[3]))) for p in pieces)
    return inside / total if total > 0 else 0.0


def _inside(x: float, extent: float, length: float) -> float:
    """P(x lies in a segment of `length` placed uniformly at random inside [0, extent]): the measure of the
    left ends in [x − length, x] ∩ [0, extent − length] over extent − length (1 when the segment spans it all)."""
    free = extent - length
    if free <= 0:
        return 1.0
    return max(0.0, min(x, free) - max(x - length, 0.0)) / free


def _inside_integral(lo: float, hi: float, extent: float, length: float) -> float:
    """∫ `_inside` over [lo, hi]: exact, the function being linear between the knots `length` and `free`."""
    if hi <= lo:
        return 0.0
    knots = sorted({lo, hi, *(k for k in (length, extent - length) if lo < k < hi)})
    return sum((b - a) * (_inside(a, extent, length) + _inside(b, extent, length)) / 2
               for a, b in zip(knots[:-1], knots[1:], strict=True))


def random_window_chances(window: Box, boxes: Sequence[Box], image_size: tuple[int, int]) -> tuple[float, float]:
    """For a window of the same width and height placed uniformly at random inside the image: the probability
    that it holds the evidence centre (the chance level of `hit`) and its expected evidence coverage (that of
    `coverage`). Exact: the placement is independent in x and y, so each is a product of one-dimensional terms,
    integrated over the evidence's disjoint pieces for the coverage."""
    w, h = image_size
    ww, wh = min(window[2] - window[0], w), min(window[3] - window[1], h)
    x1, y1, x2, y2 = geometry.union(boxes)
    hit_p = _inside((x1 + x2) / 2, w, ww) * _inside((y1 + y2) / 2, h, wh)
    pieces = _disjoint_pieces(boxes)
    total = sum(geometry.area(p) for p in pieces)
    expected = sum(_inside_integral(p[0], p[2], w, ww) * _inside_integral(p[1], p[3], h, wh) for p in pieces)
    return hit_p, (expected / total if total > 0 else 0.0)
