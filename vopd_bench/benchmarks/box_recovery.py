"""Finding where a shipped crop came from: the evidence box of a benchmark that ships `crop_image` but no box
(ZoomBench), recovered by normalised cross-correlation (OpenCV's `matchTemplate`, TM_CCOEFF_NORMED).

The crop may have been resized after it was cut (ZwZ's pipeline upscales crops 2×), so the search runs over
scales. `scale` is image pixels per crop pixel:

1. Coarse: every scale of a geometric grid around 1 (1/4 to 2, steps of 2^⅓) is matched on a reduced copy of
   the image (longer side `WORK_SIDE`, doubled while the template would be under `MIN_TEMPLATE` pixels, up to
   `MAX_WORK_SIDE`). The two best separate hits of each scale are kept.
2. Fine: the best `N_REFINE` hits are matched again around their place, at scales within 2^(±3/24) of theirs,
   at a resolution where the template has about `REFINE_SIDE` pixels on its shorter side (full resolution for
   smaller ones).

The box is accepted when the best refined score reaches `MIN_SCORE` and no hit elsewhere comes within
`AMBIGUITY_MARGIN` of it; otherwise it is refused with the reason and the sample keeps its crop view without a
box view. A flat crop (no texture) matches anywhere and is refused outright.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vopd_bench.geometry import Box

MIN_SCORE = 0.9  # TM_CCOEFF_NORMED of the refined match; true crops, resized and re-encoded, score 0.95+
AMBIGUITY_MARGIN = 0.02  # a separate hit this close to the best one makes the location ambiguous
MIN_STD = 2.0  # grey levels; a crop flatter than this has nothing to match
COARSE_STEPS = [2 ** (k / 3) for k in range(-6, 4)]  # 1/4 … 2
FINE_STEPS = [2 ** (k / 24) for k in range(-3, 4)]
WORK_SIDE = 768  # longer side of the reduced image for the coarse search
MAX_WORK_SIDE = 2048  # never search a larger copy at the coarse step (bounds the cost on 8K images)
MIN_TEMPLATE = 8  # shorter side of the template in the coarse search, in pixels
REFINE_SIDE = 128  # shorter side of the template in the fine search (full resolution if smaller)
N_REFINE = 4


@dataclass(frozen=True)
class Recovery:
    """A recovered box (xyxy, image pixels) with its match score, or None and the reason it was refused."""

    box: Box | None
    score: float
    scale: float = math.nan  # image pixels per crop pixel
    reason: str | None = None


@dataclass(frozen=True)
class _Hit:
    score: float
    scale: float
    x: float  # top-left, full-image pixels
    y: float
    w: float  # matched size, full-image pixels
    h: float

    @property
    def box(self) -> Box:
        return (self.x, self.y, self.x + self.w, self.y + self.h)


def recover_box(image: Image.Image, crop: Image.Image, min_score: float = MIN_SCORE) -> Recovery:
    """Locate `crop` inside `image` (RGB or grey PIL images)."""
    import cv2

    img, tpl = _grey(image), _grey(crop)
    H, W = img.shape
    if float(tpl.std()) < MIN_STD:
        return Recovery(None, math.nan, reason="the crop is flat: nothing to match")
    coarse = sorted(_coarse(cv2, img, tpl), key=lambda h: -h.score)
    if not coarse:
        return Recovery(None, math.nan, reason="the crop does not fit in the image at any searched scale")
    refined = [r for h in coarse[:N_REFINE] if (r := _refine(cv2, img, tpl, h)) is not None] or coarse[:1]
    best = max(refined, key=lambda h: h.score)
    score = round(best.score, 4)
    if best.score < min_score:
        return Recovery(None, score, best.scale, reason=f"best match {best.score:.3f} is under {min_score}")
    rivals = [h for h in refined if _iou(h.box, best.box) < 0.5 and h.score >= best.score - AMBIGUITY_MARGIN]
    if rivals:
        return Recovery(None, score, best.scale, reason="the crop matches several places equally well")
    box = (best.x, best.y, min(float(W), best.x + best.w), min(float(H), best.y + best.h))
    return Recovery(box, score, best.scale)


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32)


def _resized(cv2, a: np.ndarray, w: int, h: int) -> np.ndarray:
    shrink = w < a.shape[1]
    return cv2.resize(a, (max(1, w), max(1, h)), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _match(cv2, image: np.ndarray, tpl: np.ndarray) -> np.ndarray:
    res = cv2.matchTemplate(image, tpl, cv2.TM_CCOEFF_NORMED)
    return np.nan_to_num(res, nan=-1.0, posinf=-1.0, neginf=-1.0)


def _coarse(cv2, img: np.ndarray, tpl: np.ndarray) -> list[_Hit]:
    """The two best separate hits at each coarse scale, in full-image pixels."""
    H, W = img.shape
    ch, cw = tpl.shape
    hits: list[_Hit] = []
    reduced: dict[float, np.ndarray] = {}
    for s in COARSE_STEPS:
        tw, th = cw * s, ch * s
        if tw > W or th > H:
            continue
        r = min(1.0, WORK_SIDE / max(W, H))
        while r < 1.0 and min(tw, th) * r < MIN_TEMPLATE and max(W, H) * r * 2 <= MAX_WORK_SIDE:
            r = min(1.0, r * 2)
        if min(tw, th) * r < 4:
            continue
        if r not in reduced:
            reduced[r] = img if r == 1.0 else _resized(cv2, img, round(W * r), round(H * r))
        work = reduced[r]
        t = _resized(cv2, tpl, round(tw * r), round(th * r))
        if t.shape[0] > work.shape[0] or t.shape[1] > work.shape[1] or float(t.std()) < 1e-3:
            continue
        res = _match(cv2, work, t)
        for _ in range(2):
            _, score, _, (bx, by) = cv2.minMaxLoc(res)
            hits.append(_Hit(float(score), s, bx / r, by / r, tw, th))
            # Blank this hit's neighbourhood (half the template each way) to find the next separate one.
            res[max(0, by - t.shape[0] // 2): by + t.shape[0] // 2 + 1,
                max(0, bx - t.shape[1] // 2): bx + t.shape[1] // 2 + 1] = -1.0
    return hits


def _refine(cv2, img: np.ndarray, tpl: np.ndarray, hit: _Hit) -> _Hit | None:
    """The best hit near `hit` over FINE_STEPS × its scale, at a resolution where the template has about
    REFINE_SIDE pixels on its shorter side."""
    H, W = img.shape
    ch, cw = tpl.shape
    r = min(1.0, REFINE_SIDE / max(1.0, min(hit.w, hit.h)))
    m = max(4.0, 0.25 * max(hit.w, hit.h))  # covers the coarse step's error in place and size
    x0, y0 = max(0, int(hit.x - m)), max(0, int(hit.y - m))
    x1, y1 = min(W, int(hit.x + hit.w * 1.2 + m) + 1), min(H, int(hit.y + hit.h * 1.2 + m) + 1)
    window = img[y0:y1, x0:x1]
    if r < 1.0:
        window = _resized(cv2, window, round(window.shape[1] * r), round(window.shape[0] * r))
    best = None
    for f in FINE_STEPS:
        s = hit.scale * f
        tw, th = round(cw * s * r), round(ch * s * r)
        if tw < 2 or th < 2 or tw > window.shape[1] or th > window.shape[0]:
            continue
        t = _resized(cv2, tpl, tw, th)
        if float(t.std()) < 1e-3:
            continue
        _, score, _, (bx, by) = cv2.minMaxLoc(_match(cv2, window, t))
        if best is None or score > best.score:
            best = _Hit(float(score), s, x0 + bx / r, y0 + by / r, tw / r, th / r)
    return best


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
