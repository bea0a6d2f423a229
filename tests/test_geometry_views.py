"""View geometry: box parsing, clamping, crop regions and sizes, and the drawn box. Expected values are worked
out by hand in the comments."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from PIL import Image

from vopd_bench import geometry, views
from vopd_bench.errors import SampleError
from vopd_bench.views import BOX_HINT, ViewConfig

RED = (255, 0, 0)


def _gradient(width: int, height: int) -> Image.Image:
    """An image whose every pixel is distinct enough to tell where a crop came from: R = x, G = y."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    arr[..., 1] = np.arange(height, dtype=np.uint8)[:, None]
    arr[..., 2] = 77
    return Image.fromarray(arr, "RGB")


# --------------------------------------------------------------------------------------------------------------
# parse_box / parse_boxes


def test_parse_box_xyxy_and_xywh() -> None:
    assert geometry.parse_box([10, 20, 30, 40]) == (10.0, 20.0, 30.0, 40.0)
    assert geometry.parse_box((1.5, 2, 3, 4.25)) == (1.5, 2.0, 3.0, 4.25)
    # xywh: x2 = 10 + 30 = 40, y2 = 20 + 40 = 60
    assert geometry.parse_box([10, 20, 30, 40], "xywh") == (10.0, 20.0, 40.0, 60.0)
    assert geometry.parse_box(["10", "20", "30", "40"]) == (10.0, 20.0, 30.0, 40.0)  # numeric strings from CSV


@pytest.mark.parametrize(
    ("raw", "fmt", "reason"),
    [
        ([10, 10, 10, 20], "xyxy", "zero area"),
        ([10, 10, 20, 10], "xyxy", "zero area"),
        ([10, 20, 0, 5], "xywh", "zero area"),
        ([20, 10, 10, 30], "xyxy", "inverted"),
        ([10, 30, 20, 10], "xyxy", "inverted"),
        ([10, 10, -5, 5], "xywh", "inverted"),
        ([0, 0, float("nan"), 5], "xyxy", "NaN"),
        ([0, 0, float("inf"), 5], "xyxy", "NaN or infinite"),
        ([1, 2, 3], "xyxy", "4 numbers"),
        ([1, 2, 3, 4, 5], "xyxy", "4 numbers"),
        ([], "xyxy", "4 numbers"),
        ("1,2,3,4", "xyxy", "4 numbers"),
        (None, "xyxy", "4 numbers"),
        (["a", 0, 1, 1], "xyxy", "non-numeric"),
        ([0, None, 1, 1], "xyxy", "non-numeric"),
        ([0, 0, 1, 1], "cxcywh", "unknown box format"),
    ],
)
def test_parse_box_rejects(raw: object, fmt: str, reason: str) -> None:
    with pytest.raises(SampleError, match=reason):
        geometry.parse_box(raw, fmt)


def test_parse_boxes_accepts_none_one_or_many() -> None:
    assert geometry.parse_boxes(None) == ()
    assert geometry.parse_boxes([]) == ()
    assert geometry.parse_boxes([0, 0, 5, 5]) == ((0.0, 0.0, 5.0, 5.0),)
    assert geometry.parse_boxes([[0, 0, 5, 5], [1, 1, 2, 3]], "xywh") == ((0.0, 0.0, 5.0, 5.0), (1.0, 1.0, 3.0, 4.0))
    # Parquet list columns arrive as numpy arrays, one box or an array of arrays.
    assert geometry.parse_boxes(np.array([1, 2, 3, 4])) == ((1.0, 2.0, 3.0, 4.0),)
    nested = np.empty(2, dtype=object)
    nested[0], nested[1] = np.array([0.0, 0, 5, 5]), np.array([1.0, 1, 2, 3])
    assert geometry.parse_boxes(nested) == ((0.0, 0.0, 5.0, 5.0), (1.0, 1.0, 2.0, 3.0))


def test_parse_boxes_names_the_bad_box() -> None:
    with pytest.raises(SampleError, match="non-numeric"):
        geometry.parse_boxes([1, 2, "a", 4])
    with pytest.raises(SampleError, match="inverted"):
        geometry.parse_boxes([[0, 0, 5, 5], [9, 9, 1, 1]])
    with pytest.raises(SampleError, match="neither a box nor a list"):
        geometry.parse_boxes("box")


# --------------------------------------------------------------------------------------------------------------
# clamping, union, area


def test_clamp_boxes_counts_changes() -> None:
    boxes = [(-10.0, 5.0, 50.0, 60.0), (10.0, 10.0, 20.0, 20.0), (90.0, -3.0, 130.0, 10.0)]
    clamped, changed = views.clamp_boxes(boxes, 100, 50)
    # the first loses x<0 and y>50; the third loses x>100 and y<0; the second is inside
    assert clamped == ((0.0, 5.0, 50.0, 50.0), (10.0, 10.0, 20.0, 20.0), (90.0, 0.0, 100.0, 10.0))
    assert changed == 2


def test_clamp_box_inside_and_on_the_border_is_unchanged() -> None:
    assert geometry.clamp_box((0.0, 0.0, 100.0, 50.0), 100, 50) == ((0.0, 0.0, 100.0, 50.0), False)


@pytest.mark.parametrize(
    "box",
    [(120.0, 0.0, 150.0, 10.0), (-30.0, 0.0, -1.0, 10.0), (10.0, 60.0, 20.0, 70.0), (100.0, 0.0, 110.0, 10.0)],
)
def test_a_box_outside_the_image_is_a_sample_error(box: geometry.Box) -> None:
    with pytest.raises(SampleError, match="outside the 100x50 image"):
        views.clamp_boxes([(10.0, 10.0, 20.0, 20.0), box], 100, 50)


def test_union_area_relative_area() -> None:
    assert geometry.union([(10, 10, 30, 40), (60, 20, 90, 50)]) == (10, 10, 90, 50)
    assert geometry.area((10.0, 10.0, 90.0, 50.0)) == 80 * 40
    # union (0,0,50,40) covers 2000 of 100*80 = 8000 pixels
    assert geometry.relative_area([(0, 0, 50, 20), (0, 20, 50, 40)], 100, 80) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="^union of no boxes$"):
        geometry.union([])


def test_area_uses_each_axis_and_is_zero_for_a_degenerate_box() -> None:
    assert geometry.area((2.0, 30.0, 7.0, 33.0)) == 5 * 3  # x1 != y1, so a mixed-up index changes the result
    assert geometry.area((5.0, 5.0, 5.0, 9.0)) == 0.0
    assert geometry.area((5.0, 5.0, 9.0, 5.0)) == 0.0
    assert geometry.area((5.0, 5.0, 5.5, 5.25)) == pytest.approx(0.125)  # sub-pixel sides are not raised to 1


def test_clamp_box_keeps_sub_pixel_edges_and_names_the_box_to_one_decimal() -> None:
    assert geometry.clamp_box((3.0, -4.0, 9.0, 0.5), 100, 50) == ((3.0, 0.0, 9.0, 0.5), True)
    with pytest.raises(SampleError, match=r"^box \(101\.3, 2\.0, 120\.0, 7\.5\) lies outside the 100x50 image$"):
        geometry.clamp_box((101.26, 2.0, 120.0, 7.5), 100, 50)


def test_parse_boxes_reads_one_flat_box_in_its_format() -> None:
    assert geometry.parse_boxes([10, 20, 5, 6], "xywh") == ((10.0, 20.0, 15.0, 26.0),)


# --------------------------------------------------------------------------------------------------------------
# crop regions


@pytest.mark.parametrize(
    ("boxes", "context", "min_side", "expected"),
    [
        # interior box, tight: the box itself
        ([(40, 50, 100, 80)], 1.0, 28, (40, 50, 100, 80)),
        # top-left corner, raised to 28: centre (5,5) gives -9..19, shifted right/down to 0..28 (not shrunk)
        ([(0, 0, 10, 10)], 1.0, 28, (0, 0, 28, 28)),
        # bottom-right corner of 200x100: x 181..209 -> 172..200, y 81..109 -> 72..100
        ([(190, 90, 200, 100)], 1.0, 28, (172, 72, 200, 100)),
        # several boxes: their union (10,10)-(90,50)
        ([(10, 10, 30, 40), (60, 20, 90, 50)], 1.0, 28, (10, 10, 90, 50)),
        # context 2 around (100,50): 80 x 40
        ([(80, 40, 120, 60)], 2.0, 28, (60, 30, 140, 70)),
        # context 2 at the corner: x -25..75 -> 0..100; y span 100 >= image height -> 0..100
        ([(0, 0, 50, 50)], 2.0, 28, (0, 0, 100, 100)),
        # a region larger than the image is cut to it
        ([(0, 0, 200, 100)], 1.5, 28, (0, 0, 200, 100)),
        ([(90, 40, 110, 60)], 1.0, 500, (0, 0, 200, 100)),
        # fractional box raised to 28 about (20.6, 30.55): 6.6..34.6 -> 6..35, 16.55..44.55 -> 16..45
        ([(10.5, 20.2, 30.7, 40.9)], 1.0, 28, (6, 16, 35, 45)),
        # min_side 1 keeps a thin box: 3 x 60
        ([(100, 20, 103, 80)], 1.0, 1, (100, 20, 103, 80)),
    ],
)
def test_crop_region(boxes: list, context: float, min_side: int, expected: tuple[int, int, int, int]) -> None:
    assert geometry.crop_region(boxes, 200, 100, context, min_side) == expected


def test_crop_region_properties_on_random_boxes() -> None:
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(30, 400), rng.randint(30, 400)
        x1, y1 = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
        box = (x1, y1, rng.uniform(x1 + 0.5, w), rng.uniform(y1 + 0.5, h))
        context, min_side = rng.choice([1.0, 1.2, 2.0]), rng.choice([1, 28, 64])
        rx1, ry1, rx2, ry2 = geometry.crop_region([box], w, h, context, min_side)
        assert 0 <= rx1 < rx2 <= w and 0 <= ry1 < ry2 <= h  # inside the image
        assert rx1 <= box[0] and ry1 <= box[1] and rx2 >= box[2] and ry2 >= box[3]  # the evidence is all there
        # each side is the scaled box raised to min_side, unless that is the whole image (shifting never shrinks)
        assert rx2 - rx1 >= min(w, max(min_side, math.floor(context * (box[2] - box[0]))))
        assert ry2 - ry1 >= min(h, max(min_side, math.floor(context * (box[3] - box[1]))))
        assert rx2 - rx1 <= max(min_side, context * (box[2] - box[0])) + 2  # floor/ceil add at most a pixel a side


# --------------------------------------------------------------------------------------------------------------
# crop view


def test_crop_view_size_and_content() -> None:
    img = _gradient(200, 100)
    crop, region = views.crop_view(img, [(40, 50, 100, 80)], ViewConfig(zoom=2.0))
    assert region == (40, 50, 100, 80)
    assert crop.size == (120, 60)  # (60 x 30) x 2
    same, _ = views.crop_view(img, [(40, 50, 100, 80)], ViewConfig(zoom=1.0))
    arr = np.asarray(same)
    assert same.size == (60, 30)
    assert arr[0, 0].tolist() == [40, 50, 77] and arr[-1, -1].tolist() == [99, 79, 77]


def test_crop_view_at_the_edge_keeps_min_side_times_zoom() -> None:
    img = _gradient(200, 100)
    crop, region = views.crop_view(img, [(190, 90, 200, 100)], ViewConfig(zoom=1.5, min_side=28))
    assert region == (172, 72, 200, 100)
    assert crop.size == (42, 42)  # 28 x 1.5


def test_crop_view_context_and_oversized_region() -> None:
    img = _gradient(200, 100)
    crop, region = views.crop_view(img, [(80, 40, 120, 60)], ViewConfig(context=2.0, zoom=1.0))
    assert region == (60, 30, 140, 70) and crop.size == (80, 40)
    crop, region = views.crop_view(img, [(0, 0, 200, 100)], ViewConfig(context=3.0, zoom=2.0))
    assert region == (0, 0, 200, 100) and crop.size == (400, 200)


# --------------------------------------------------------------------------------------------------------------
# box view and render


def test_box_view_draws_red_outside_and_keeps_the_inside() -> None:
    img = _gradient(100, 80)
    box = (30.0, 20.0, 60.0, 50.0)  # covers pixel columns 30..59 and rows 20..49
    out = np.asarray(views.box_view(img, [box]))
    src = np.asarray(img)
    # default width: max(2, round(0.005 * 100)) = 2, drawn on columns 28-29 and 60-61, rows 18-19 and 50-51
    assert np.array_equal(out[20:50, 30:60], src[20:50, 30:60])
    for x, y in [(28, 35), (29, 35), (60, 35), (61, 35), (45, 18), (45, 19), (45, 50), (45, 51), (28, 18), (61, 51)]:
        assert tuple(out[y, x]) == RED, (x, y)
    for x, y in [(27, 35), (62, 35), (45, 17), (45, 52), (0, 0)]:
        assert tuple(out[y, x]) == tuple(src[y, x]), (x, y)
    # the input image is not modified
    assert np.array_equal(np.asarray(img), src)


def test_box_view_at_the_edge_and_explicit_width() -> None:
    img = _gradient(100, 80)
    out = np.asarray(views.box_view(img, [(0.0, 0.0, 10.0, 10.0)], ViewConfig(box_width=3)))
    # the left/top sides fall off the image; the evidence is intact and the right side is red at x 10..12
    assert np.array_equal(out[0:10, 0:10], np.asarray(img)[0:10, 0:10])
    assert tuple(out[5, 10]) == RED and tuple(out[5, 12]) == RED and tuple(out[5, 13]) != RED
    assert tuple(out[12, 5]) == RED and tuple(out[13, 5]) != RED


def test_box_view_draws_every_box() -> None:
    img = Image.new("RGB", (100, 80), (0, 0, 255))
    out = np.asarray(views.box_view(img, [(10.0, 10.0, 20.0, 20.0), (60.0, 40.0, 80.0, 70.0)]))
    assert tuple(out[15, 8]) == RED and tuple(out[55, 58]) == RED
    assert tuple(out[15, 15]) == (0, 0, 255) and tuple(out[55, 70]) == (0, 0, 255)


def test_render_views_and_hint() -> None:
    img = _gradient(200, 100)
    q = "What colour is the triangle?\n(A) red\n(B) blue"
    boxes = [(40.0, 50.0, 100.0, 80.0)]
    full = views.render("full", img, q, boxes)
    assert full.image is img and full.question == q and full.region is None
    crop = views.render("crop", img, q, boxes)
    assert crop.question == q and crop.region == (40, 50, 100, 80) and crop.image.size == (120, 60)
    box = views.render("box", img, q, boxes)
    assert box.question == f"{q}\n{BOX_HINT}"
    assert BOX_HINT == "Only focus on the objects inside the red bounding box in the image to answer this question."
    provided = Image.new("RGB", (7, 9))
    assert views.render("crop", img, q, boxes, provided_crop=provided).image is provided
    with pytest.raises(ValueError, match="unknown view"):
        views.render("zoom", img, q, boxes)


def test_crop_region_defaults_are_tight_with_a_28_pixel_floor() -> None:
    # a 10-px box centred at 15: context 1.0 keeps it, the 28-px floor widens it to 1..29 on both axes
    assert geometry.crop_region([(10.0, 10.0, 20.0, 20.0)], 100, 100) == (1, 1, 29, 29)
    # a 40 × 30 box is above the floor: exactly its own extent
    assert geometry.crop_region([(10.0, 20.0, 50.0, 50.0)], 100, 100) == (10, 20, 50, 50)


def test_view_config_as_dict_names_every_setting() -> None:
    assert views.ViewConfig().as_dict() == {"context": 1.0, "min_side": 28, "zoom": 2.0, "box_width": 0}


def _pattern(w: int, h: int) -> Image.Image:
    """Sharp 1-px stripes: every resampling filter gives it different pixels."""
    img = Image.new("RGB", (w, h))
    img.putdata([((x * 37) % 256, (y * 91) % 256, ((x ^ y) * 13) % 256) for y in range(h) for x in range(w)])
    return img


def test_crop_view_uses_the_config_and_lanczos() -> None:
    img = _pattern(120, 90)
    cfg = views.ViewConfig(min_side=40, zoom=1.5)
    crop, region = views.crop_view(img, [(50.0, 40.0, 60.0, 50.0)], cfg)
    assert region == (35, 25, 75, 65)  # the 40-px floor around the centre (55, 45)
    assert crop.size == (60, 60)
    assert crop.tobytes() == img.crop(region).resize((60, 60), Image.Resampling.LANCZOS).tobytes()
    # a zoom that rounds a side to zero still leaves one pixel
    tiny, _ = views.crop_view(img, [(5.0, 5.0, 6.0, 6.0)], views.ViewConfig(min_side=1, zoom=0.4))
    assert tiny.size == (1, 1)
    rendered = views.render("crop", img, "Q?", [(50.0, 40.0, 60.0, 50.0)], cfg)
    assert rendered.region == region and rendered.image.size == (60, 60) and rendered.question == "Q?"


def test_box_view_default_width_grows_with_the_image_and_render_passes_the_config() -> None:
    img = Image.new("RGB", (1000, 400), (0, 0, 0))
    out = views.box_view(img, [(100.0, 100.0, 200.0, 200.0)])
    # 0.5% of 1000 = 5 px, drawn just outside the box: columns 95..99 are red, 94 is not
    assert [out.getpixel((x, 150)) for x in (94, 95, 99, 100)] == [(0, 0, 0), (255, 0, 0), (255, 0, 0), (0, 0, 0)]
    boxed = views.render("box", img, "Q?", [(100.0, 100.0, 200.0, 200.0)], views.ViewConfig(box_width=9))
    assert boxed.image.getpixel((91, 150)) == (255, 0, 0) and boxed.image.getpixel((90, 150)) == (0, 0, 0)


def test_hint_keeps_the_question_start_and_a_provided_crop_keeps_the_question() -> None:
    assert views.with_hint("  What is it?  ") == "  What is it?\n" + views.BOX_HINT
    given = Image.new("RGB", (7, 5))
    r = views.render("crop", _pattern(50, 50), "Q?", [(1.0, 1.0, 5.0, 5.0)], provided_crop=given)
    assert r.image is given and r.question == "Q?" and r.region is None
    with pytest.raises(ValueError, match=r"expected one of full, crop, box, selfcrop$"):
        views.render("zoomed", given, "Q?", [])
