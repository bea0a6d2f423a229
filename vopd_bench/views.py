"""The three views of a sample, as pure functions of (image, boxes).

- `full`: the image as is.
- `crop`: the evidence region (union of boxes, context, minimum side, clamped), resized by `zoom`.
- `box`: the full image with the evidence outlined in red, plus the paper's hint appended to the question.

box − full measures *where to look*; crop − box measures *how closely it looks*.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from vopd_bench import geometry
from vopd_bench.geometry import Box

VIEWS = ("full", "crop", "box")  # the default views
# Views chosen from the model's own attention (vopd_bench.selfcrop); rendered as the full image here, the
# window is cut later, once the model has looked.
ATTENTION_VIEWS = ("selfcrop",)
ALL_VIEWS = VIEWS + ATTENTION_VIEWS
# The spatial constraint of Vision-OPD / ZwZ training data (paper.md §3), spelled correctly.
BOX_HINT = "Only focus on the objects inside the red bounding box in the image to answer this question."


@dataclass(frozen=True)
class ViewConfig:
    """How the crop and box views are drawn. Defaults follow the paper: a tight crop resized ×2."""

    context: float = 1.0  # side multiplier around the union box; 1.0 = tight
    min_side: int = 28  # smallest crop side in source pixels (one Qwen-VL merged patch)
    zoom: float = 2.0  # resize factor applied to the crop
    box_width: int = 0  # outline width in pixels; 0 = max(2, 0.5% of the longer image side)

    def as_dict(self) -> dict:
        return {"context": self.context, "min_side": self.min_side, "zoom": self.zoom, "box_width": self.box_width}


@dataclass(frozen=True)
class RenderedView:
    image: Image.Image
    question: str  # the question as this view asks it (the box view appends the hint)
    region: tuple[int, int, int, int] | None = None  # the crop region in source pixels, if any


def clamp_boxes(boxes: Sequence[Box], width: int, height: int) -> tuple[tuple[Box, ...], int]:
    """Clamp every box to the image; returns the boxes and how many were changed."""
    out, changed = [], 0
    for b in boxes:
        c, was = geometry.clamp_box(b, width, height)
        out.append(c)
        changed += was
    return tuple(out), changed


def full_view(image: Image.Image) -> Image.Image:
    return image


def crop_view(image: Image.Image, boxes: Sequence[Box], cfg: ViewConfig = ViewConfig()) -> tuple[Image.Image, tuple[int, int, int, int]]:
    region = geometry.crop_region(boxes, image.width, image.height, cfg.context, cfg.min_side)
    crop = image.crop(region)
    if cfg.zoom != 1.0:
        size = (max(1, round(crop.width * cfg.zoom)), max(1, round(crop.height * cfg.zoom)))
        crop = crop.resize(size, Image.Resampling.LANCZOS)
    return crop, region


def box_view(image: Image.Image, boxes: Sequence[Box], cfg: ViewConfig = ViewConfig()) -> Image.Image:
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = cfg.box_width or max(2, round(0.005 * max(image.width, image.height)))
    for x1, y1, x2, y2 in boxes:
        # Draw just outside the box so the outline never hides the evidence itself.
        draw.rectangle((x1 - width, y1 - width, x2 + width - 1, y2 + width - 1), outline=(255, 0, 0), width=width)
    return out


def with_hint(question: str) -> str:
    return f"{question.rstrip()}\n{BOX_HINT}"


def render(view: str, image: Image.Image, question: str, boxes: Sequence[Box], cfg: ViewConfig = ViewConfig(),
           provided_crop: Image.Image | None = None) -> RenderedView:
    """Render one view. `boxes` must already be clamped to the image."""
    if view in ("full", *ATTENTION_VIEWS):
        return RenderedView(full_view(image), question)
    if view == "crop":
        if provided_crop is not None:
            return RenderedView(provided_crop, question)
        crop, region = crop_view(image, boxes, cfg)
        return RenderedView(crop, question, region)
    if view == "box":
        return RenderedView(box_view(image, boxes, cfg), with_hint(question))
    raise ValueError(f"unknown view {view!r}; expected one of {', '.join(ALL_VIEWS)}")
