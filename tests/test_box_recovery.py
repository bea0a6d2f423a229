"""Evidence boxes recovered from shipped crops (ZoomBench): generated images with known boxes, exact crops and
crops resized as benchmark pipelines resize them, recovered with IoU ≥ 0.9; weak matches refused."""

from __future__ import annotations

import io

import hub_fixtures as fx
import numpy as np
import pytest
from PIL import Image
from report_fixtures import SaysBackend

from vopd_bench.benchmarks import load
from vopd_bench.benchmarks.box_recovery import MIN_SCORE, recover_box
from vopd_bench.runner import GapReportConfig, run_gap_report


def _scene(seed: int, size: tuple[int, int] = (800, 600)) -> Image.Image:
    """A photo-like image: smooth random shapes plus fine texture, so content survives resampling."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = Image.fromarray(rng.integers(0, 256, (h // 40, w // 40, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    mid = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    fine = rng.normal(0, 12, (h, w, 3))
    arr = 0.6 * np.asarray(coarse, float) + 0.4 * np.asarray(mid, float) + fine
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _jpeg(img: Image.Image, quality: int = 85) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


CASES = [  # (seed, box xyxy, how the crop was made)
    (1, (300, 200, 420, 290), "exact"),
    (2, (40, 380, 100, 440), "exact"),  # small, near a corner
    (3, (500, 100, 620, 260), "upscaled x2"),  # ZwZ: crop then 2× LANCZOS
    (4, (250, 300, 330, 350), "upscaled x3"),
    (5, (100, 60, 400, 300), "downscaled x0.6"),
    (6, (610, 410, 700, 500), "upscaled x2, jpeg"),
]


@pytest.mark.parametrize(("seed", "box", "how"), CASES)
def test_recovers_known_boxes(seed, box, how):
    image = _scene(seed)
    crop = image.crop(box)
    w, h = crop.size
    if "x2" in how:
        crop = crop.resize((w * 2, h * 2), Image.LANCZOS)
    elif "x3" in how:
        crop = crop.resize((w * 3, h * 3), Image.LANCZOS)
    elif "x0.6" in how:
        crop = crop.resize((round(w * 0.6), round(h * 0.6)), Image.LANCZOS)
    if "jpeg" in how:
        crop = _jpeg(crop)
    rec = recover_box(image, crop)
    assert rec.box is not None, (how, rec)
    assert _iou(rec.box, box) >= 0.9, (how, rec)
    assert rec.score >= MIN_SCORE and rec.reason is None


def test_a_crop_of_another_image_is_refused():
    rec = recover_box(_scene(10), _scene(11).crop((200, 200, 320, 300)))
    assert rec.box is None and rec.score < MIN_SCORE and "under" in rec.reason


def test_a_flat_crop_is_refused():
    rec = recover_box(_scene(12), Image.new("RGB", (60, 40), (128, 128, 128)))
    assert rec.box is None and "flat" in rec.reason


def test_a_repeated_pattern_is_ambiguous():
    tile = _scene(13, (100, 100))
    image = Image.new("RGB", (400, 200))
    for x in (0, 100, 200, 300):
        for y in (0, 100):
            image.paste(tile, (x, y))
    rec = recover_box(image, tile.crop((10, 10, 70, 70)))
    assert rec.box is None and "several places" in rec.reason


def test_a_crop_larger_than_the_image_is_refused():
    rec = recover_box(_scene(14, (80, 80)), _scene(15, (400, 400)))  # a quarter of it is still too big
    assert rec.box is None and rec.reason


@pytest.fixture(scope="module")
def zoom(tmp_path_factory):
    import datasets

    datasets.disable_progress_bars()
    return fx.write_zoombench_crops(tmp_path_factory.mktemp("zoom"))


def test_zoombench_boxes_are_recovered_from_crops(zoom):
    s = {x.id: x for x in load("zoombench", data_dir=str(zoom)).samples}
    for sid, box in fx.ZOOM_BOXES.items():
        (got,) = s[sid].boxes
        assert _iou(got, box) >= 0.9, sid
        assert s[sid].metadata["box_source"] == "recovered" and s[sid].metadata["box_score"] >= MIN_SCORE
    for sid in ("zr-foreign", "zr-flat"):  # refused: the crop view stays, no box view
        assert s[sid].boxes == () and s[sid].has_evidence
        assert s[sid].metadata["box_source"] == "none" and s[sid].metadata["box_note"]
    assert s["zr-foreign"].metadata["box_score"] < MIN_SCORE
    assert s["zr-none"].boxes == () and not s["zr-none"].has_evidence and "box_source" not in s["zr-none"].metadata
    assert all(x.answer_type == "mcq" for x in s.values())  # "multiple choice" with a space


def test_recovered_boxes_give_zoombench_a_box_view_and_gap_split(zoom, tmp_path):
    cfg = GapReportConfig(model="always-a", benchmarks=["zoombench"], out=str(tmp_path), quiet=True,
                          data_dir=str(zoom))
    result = run_gap_report(cfg, backend=SaysBackend("A"))
    views = {(r.sample_id, r.view): r for r in result.records}
    assert {v for (sid, v) in views if sid == "zr-x2"} == {"full", "crop", "box"}
    assert {v for (sid, v) in views if sid == "zr-foreign"} == {"full", "crop"}
    assert views[("zr-x2", "box")].meta["box_source"] == "recovered" and views[("zr-x2", "box")].evidence_area > 0
    metrics = set(result.summary[result.summary.benchmark == "zoombench"].metric)
    assert {"gap_locate", "gap_zoom"} <= metrics and any(m.startswith("gap_area:") for m in metrics)
