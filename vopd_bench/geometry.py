"""Pure box geometry. Boxes are (x1, y1, x2, y2) in pixels, x2 > x1 and y2 > y1."""

from __future__ import annotations

import math
from collections.abc import Sequence

from vopd_bench.errors import SampleError

Box = tuple[float, float, float, float]


def parse_box(raw: object, fmt: str = "xyxy") -> Box:
    """Validate one raw box and convert it to xyxy. Raises SampleError with the reason."""
    if fmt not in ("xyxy", "xywh"):
        raise SampleError(f"unknown box format {fmt!r} (expected xyxy or xywh)")
    raw = _as_list(raw)
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise SampleError(f"box {raw!r} must have 4 numbers")
    try:
        vals = [float(v) for v in raw]
    except (TypeError, ValueError):
        raise SampleError(f"box {raw!r} has a non-numeric coordinate") from None
    if any(not math.isfinite(v) for v in vals):
        raise SampleError(f"box {raw!r} has a NaN or infinite coordinate")
    x1, y1, a, b = vals
    x2, y2 = (x1 + a, y1 + b) if fmt == "xywh" else (a, b)
    if x2 < x1 or y2 < y1:
        raise SampleError(f"box {raw!r} is inverted ({fmt})")
    if x2 == x1 or y2 == y1:
        raise SampleError(f"box {raw!r} has zero area ({fmt})")
    return (x1, y1, x2, y2)


def parse_boxes(raw: object, fmt: str = "xyxy") -> tuple[Box, ...]:
    """Accept None, one box, or a list of boxes."""
    raw = _as_list(raw)
    if raw is None:
        return ()
    if isinstance(raw, (list, tuple)) and len(raw) == 0:
        return ()
    # No element is itself a sequence: this is one box, possibly with a bad coordinate that parse_box will name.
    if isinstance(raw, (list, tuple)) and not any(isinstance(v, (list, tuple)) or getattr(v, "ndim", 0) for v in raw):
        return (parse_box(raw, fmt),)
    if isinstance(raw, (list, tuple)):
        return tuple(parse_box(b, fmt) for b in raw)
    raise SampleError(f"bbox {raw!r} is neither a box nor a list of boxes")


def _as_list(raw: object) -> object:
    """Parquet hands list columns over as numpy arrays (a list of boxes as an array of arrays)."""
    return raw.tolist() if hasattr(raw, "tolist") else raw


def clamp_box(box: Box, width: int, height: int) -> tuple[Box, bool]:
    """Clamp a box to the image. Returns the box and whether it was changed.

    A box that lies entirely outside the image has no evidence left in it: that is a sample error.
    """
    x1, y1, x2, y2 = box
    c = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    if c[2] <= c[0] or c[3] <= c[1]:
        raise SampleError(f"box {tuple(round(v, 1) for v in box)} lies outside the {width}x{height} image")
    return c, c != box


def union(boxes: Sequence[Box]) -> Box:
    if not boxes:
        raise ValueError("union of no boxes")
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def relative_area(boxes: Sequence[Box], width: int, height: int) -> float:
    """Area of the union box over the image area: the evidence size used for binning."""
    return area(union(boxes)) / float(width * height)


def crop_region(boxes: Sequence[Box], width: int, height: int, context: float = 1.0, min_side: int = 28) -> tuple[int, int, int, int]:
    """The integer pixel region that the crop view shows.

    The union of the boxes is scaled about its centre by `context` (1.0 = tight), each side is raised to at
    least `min_side`, and the region is shifted back inside the image where it overhangs; only a region larger
    than the image is cut to it.
    """
    ux1, uy1, ux2, uy2 = union(boxes)
    cx, cy = (ux1 + ux2) / 2, (uy1 + uy2) / 2
    w = max((ux2 - ux1) * context, float(min_side))
    h = max((uy2 - uy1) * context, float(min_side))
    x1, x2 = _fit_span(cx - w / 2, cx + w / 2, width)
    y1, y2 = _fit_span(cy - h / 2, cy + h / 2, height)
    return x1, y1, x2, y2


def _fit_span(lo: float, hi: float, limit: int) -> tuple[int, int]:
    lo_i, hi_i = math.floor(lo), math.ceil(hi)
    if hi_i - lo_i >= limit:
        return 0, limit
    if lo_i < 0:
        lo_i, hi_i = 0, hi_i - lo_i
    if hi_i > limit:
        lo_i, hi_i = lo_i - (hi_i - limit), limit
    return lo_i, hi_i
