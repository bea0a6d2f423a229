"""--focus and the selfcrop view: the definitions on hand-computed maps (evidence share, the paper's window and
its neighbour-contrast score, the grid window, chance levels of random windows), the summary rows by hand, the
capture against transformers' own eager attention, and planted attention maps followed through the real backend
and runner (the window follows the attention, not the evidence; unusable maps are per-sample errors)."""

import json

import numpy as np
import pytest
from PIL import Image

from vopd_bench import attention, focus, selfcrop
from vopd_bench.attention import BadAttention, ImageAttention
from vopd_bench.errors import VopdError
from vopd_bench.views import ViewConfig

# ---- definitions on hand-made maps ----------------------------------------------------------------------------


def _att(maps, size=(200, 100)):
    maps = np.asarray(maps, dtype=np.float32)
    maps = maps[None] if maps.ndim == 2 else maps
    return ImageAttention(tuple(range(len(maps))), maps, size)


def test_share_is_attention_on_the_evidence_over_attention_on_the_image():
    att = np.ones((4, 4))
    att[0, :2] = 7.0  # cells (0,0) and (0,1) hold 14 of 28
    # a 200 x 100 image on a 4 x 4 grid: cells are 50 x 25 px; the box covers exactly those two cells
    es = attention.evidence_share(_att([att, np.ones((4, 4))]), [(0, 0, 100, 25)])
    assert es.shares == pytest.approx((14 / 28, 2 / 16)) and es.area == pytest.approx(2 / 16)
    assert es.at(1) == pytest.approx(es.area)  # uniform attention: the share is the area
    # a box that covers no lattice point of any cell has no area: no focus number at all
    assert attention.evidence_share(_att(att), [(0, 0, 0.0001, 0.0001)]) is None
    # the evidence filling the whole image: share and area both exactly 1, whatever the map
    full = attention.evidence_share(_att(np.random.default_rng(0).random((4, 4))), [(0, 0, 200, 100)])
    assert full.shares == (1.0,) and full.area == 1.0


def test_partial_cells_count_by_covered_fraction_and_overlaps_once():
    cov = attention.cell_coverage([(0, 0, 25, 25), (0, 0, 25, 25), (75, 0, 100, 50)], (100, 100), (2, 2))
    # cells are 50 px: the first box (twice) covers a quarter of cell (0,0), the last half of cell (0,1)
    np.testing.assert_allclose(cov, [[0.25, 0.5], [0.0, 0.0]])


@pytest.mark.parametrize("bad, reason", [(np.full((2, 2), np.nan), "non-finite"), (np.array([[1.0, np.inf]]), "non-finite"),
                                         (np.array([[1.0, -0.5]]), "negative"), (np.zeros((3, 3)), "no mass")])
def test_unusable_maps_are_refused_with_the_reason(bad, reason):
    with pytest.raises(BadAttention, match=reason):
        attention.check_map(bad)
    with pytest.raises(BadAttention, match=reason):
        attention.evidence_share(_att(bad, (10, 10)), [(0, 0, 10, 10)])
    with pytest.raises(BadAttention, match=reason):
        selfcrop.paper_relative_attention(bad, np.ones_like(bad))
    with pytest.raises(BadAttention, match=reason):
        selfcrop.relative_attention(np.ones_like(bad), bad)


def test_default_layer_is_the_family_depth():
    depth = 22 / 36
    assert attention.default_layer(range(36), depth) == 22  # Qwen2.5-VL-3B: the official code's layer
    assert attention.default_layer(range(28), depth) == 17
    assert attention.default_layer(range(3), depth) == 1  # the toy: its middle layer
    # a hybrid model captures only its full-attention layers; the depth indexes those
    assert attention.default_layer([3, 7, 11, 15, 19, 23], depth) == 15


def test_bands_are_thirds_of_the_layers():
    assert [attention.band_slice(9, b) for b in attention.BANDS] == [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert [attention.band_slice(3, b) for b in attention.BANDS] == [slice(0, 1), slice(1, 2), slice(2, 3)]
    maps = np.stack([np.full((2, 2), float(i)) for i in range(6)])
    att = ImageAttention(tuple(range(6)), maps, (10, 10))
    assert att.band("middle")[0, 0] == 2.5 and att.band("late")[0, 0] == 4.5 and att.layer(4)[0, 0] == 4.0
    with pytest.raises(ValueError, match="unknown layer band"):
        attention.band_slice(3, "top")


# ---- the paper's method ---------------------------------------------------------------------------------------


def test_paper_relative_attention_divides_the_maps_as_they_are():
    q = np.array([[2.0, 2.0], [4.0, 1.0]])
    g = np.array([[1.0, 4.0], [2.0, 1.0]])
    np.testing.assert_allclose(selfcrop.paper_relative_attention(q, g), [[2.0, 0.5], [2.0, 1.0]])
    with pytest.raises(BadAttention, match="0 on 1 image token"):
        selfcrop.paper_relative_attention(q, np.array([[1.0, 0.0], [1.0, 1.0]]))


def _block_map(rows, cols, r0, c0, h, w, value=10.0):
    rel = np.ones((rows, cols))
    rel[r0:r0 + h, c0:c0 + w] = value
    return rel


def test_paper_window_by_hand_small_block():
    # 280 x 280 px on a 10 x 10 grid (28 px cells), base 56 px: sizes 56, 67.2, 78.4, 89.6, 100.8, 112 px are
    # 2, 2, 2, 3, 3, 4 cells. A 2 x 2 block of 10 on ones at rows 4-5, cols 6-7:
    #   2 cells: sum 40 at (4, 6); its 4 neighbours each hold 2 block cells + 2 ones = 22 -> (40 - 22) / 4 = 4.5
    #   3 cells: sum 45 at (3, 5) (leftmost, then topmost of the four ties); left 27, right 45, up 27, down 45
    #            -> (45 - 36) / 9 = 1.0
    #   4 cells: sum 52 at (2, 4); left 34, right 52, up 34, down 52 -> (52 - 43) / 16 = 0.5625
    rel = _block_map(10, 10, 4, 6, 2, 2)
    sums3 = selfcrop.window_sums(rel, 3)
    assert sums3[3, 5] == 45 and selfcrop.neighbour_score(sums3, 3, 5, 9) == pytest.approx(1.0)
    assert selfcrop.neighbour_score(selfcrop.window_sums(rel, 4), 2, 4, 16) == pytest.approx(0.5625)
    w = selfcrop.paper_window(rel, (280, 280), 56)
    assert (w.row, w.col, w.cells) == (4, 6, (2, 2)) and w.score == pytest.approx(4.5)
    # the smallest size wins the tie among the three 2-cell sizes: a 56 px square centred on the window
    assert w.box == (168.0, 112.0, 224.0, 168.0)


def test_paper_window_by_hand_larger_size_wins():
    # a 3 x 3 block at rows 3-5, cols 3-5: 2 cells (40 - 31) / 4 = 2.25; 3 cells (90 - 63) / 9 = 3.0;
    # 4 cells (97 - 83.5) / 16 = 0.84375. The first 3-cell size is 89.6 px (ratio 1.6): half 44 px around the
    # window's centre int(3 * 28 + 28 * 3 / 2) = 126.
    rel = _block_map(10, 10, 3, 3, 3, 3)
    w = selfcrop.paper_window(rel, (280, 280), 56)
    assert (w.row, w.col, w.cells) == (3, 3, (3, 3)) and w.score == pytest.approx(3.0)
    assert w.box == (82.0, 82.0, 170.0, 170.0)


def test_paper_window_ties_go_left_then_up_as_the_official_scan():
    # two equal one-cell peaks, at (0, 2) and (1, 1), on a 4 x 4 grid of 10 px cells with a 10 px base: both score
    # (5 - 1) / 1 = 4 and the 2-cell size scores (12 - 8) / 4 = 1. The official code scans columns, then rows:
    # the left peak wins, though it comes second in raster order.
    rel = np.ones((4, 4))
    rel[0, 2] = rel[1, 1] = 5.0
    w = selfcrop.paper_window(rel, (40, 40), 10)
    assert (w.row, w.col, w.cells) == (1, 1, (1, 1)) and w.box == (10.0, 10.0, 20.0, 20.0)


def test_paper_window_stays_inside_the_image_and_uses_non_square_cells():
    # 300 x 150 px on 5 x 10 cells (30 x 30 px); the peak in the top-left corner cell; base 60 px = 2 x 2 cells
    rel = np.ones((5, 10))
    rel[0, 0] = 50.0
    w = selfcrop.paper_window(rel, (300, 150), 60)
    assert (w.row, w.col, w.cells) == (0, 0, (2, 2))
    assert w.box == (0.0, 0.0, 60.0, 60.0)  # centre (30, 30) is already at the margin
    # cells of 40 x 25 px (400 x 100 px, 4 x 10 grid): 60 px is int(60 / 40) = 1 column by int(60 / 25) = 2 rows
    rel = np.ones((4, 10))
    rel[3, 9] = 50.0
    w = selfcrop.paper_window(rel, (400, 100), 60)
    assert w.cells == (2, 1) and (w.row, w.col) == (2, 9)
    assert w.box == (340.0, 40.0, 400.0, 100.0)  # moved left and up to fit: a 60 px square in the corner


def test_paper_window_is_the_whole_image_when_the_smallest_size_covers_the_map():
    # the toy: 224 px images on 8 x 8 cells; the 224 px base covers all of it
    w = selfcrop.paper_window(np.random.default_rng(0).random((8, 8)), (224, 224), 224)
    assert w.box == (0.0, 0.0, 224.0, 224.0) and w.cells == (8, 8)
    # 336 x 224 px: 224 px is 8 of 12 columns and every row, so windows slide sideways only; 268.8 px is
    # 9 columns; from 313.6 px (11 of 12 columns) up; 358.4 px and more cover the whole width: not tried.
    rel = np.ones((8, 12))
    rel[:, 10:] = 5.0
    w = selfcrop.paper_window(rel, (336, 224), 224)
    assert w.cells[0] == 8 and w.col + w.cells[1] == 12 and w.box[2] == 336.0


def test_paper_method_settings_are_in_the_key():
    a = selfcrop.SelfCrop("paper", layer=22, native_side=224).settings()
    assert a["layer"] == 22 and a["native_side"] == 224 and a["shown"] == "full image + crop"
    assert selfcrop.SelfCrop("paper", layer=21, native_side=224).settings() != a
    assert selfcrop.SelfCrop("grid").settings()["band"] == "middle"
    with pytest.raises(ValueError, match="needs a layer"):
        selfcrop.SelfCrop("paper")


def test_generic_prompt_carries_the_format_text_in_the_paper_method():
    from vopd_bench.benchmarks.spec import BenchmarkSpec

    spec = BenchmarkSpec(name="x", source="test", load_rows=list)
    paper = selfcrop.generic_prompt(spec.render_prompt, ("red", "blue"), "paper")
    question = spec.render_prompt("What colour is it?", ("red", "blue"))
    # the two prompts differ by the first sentence only
    assert paper.replace(selfcrop.GENERIC_PROMPT, "") == question.replace("What colour is it?", "")
    assert selfcrop.generic_prompt(spec.render_prompt, ("red",), "grid") == selfcrop.GENERIC_PROMPT


# ---- vopd's grid method ---------------------------------------------------------------------------------------


def test_grid_relative_attention_divides_normalised_maps():
    q = np.array([[2.0, 2.0], [4.0, 0.0]])
    g = np.array([[1.0, 1.0], [1.0, 1.0]])
    eps = 0.04
    np.testing.assert_allclose(selfcrop.relative_attention(q, g, eps), (q / 8) / (g / 4 + eps / 4))


def _brute_force_window(rel, fractions):
    best = None
    short = min(rel.shape)
    for side in sorted({min(short, max(1, round(f * short))) for f in fractions}):
        sums = {(r, c): rel[r:r + side, c:c + side].sum()
                for r in range(rel.shape[0] - side + 1) for c in range(rel.shape[1] - side + 1)}
        top = max(sums.values())
        r, c = min(k for k, v in sums.items() if v == top)
        sharp = top / (sum(sums.values()) / len(sums))
        if best is None or sharp > best[0]:
            best = (sharp, r, c, side)
    return best


def test_grid_window_is_the_sharpest_maximum():
    rng = np.random.default_rng(3)
    for _ in range(20):
        rel = rng.random((6, 9)) ** 4
        w = selfcrop.choose_window(rel, (900, 600), (0.25, 0.5, 0.75))
        sharp, r, c, side = _brute_force_window(rel, (0.25, 0.5, 0.75))
        assert (w.row, w.col, w.cells) == (r, c, (side, side)) and w.score == pytest.approx(sharp)
        assert w.box == pytest.approx((c * 100, r * 100, (c + side) * 100, (r + side) * 100))


def test_planted_block_wins_over_a_sink_that_the_generic_map_shares():
    q, g = np.ones((8, 8)), np.ones((8, 8))
    q[0, 0] = g[0, 0] = 50.0  # a sink: attended whatever is asked
    q[4:6, 2:4] = 10.0  # the question's evidence
    for rel, pick in ((selfcrop.relative_attention(q, g), lambda r: selfcrop.choose_window(r, (224, 224))),
                      (selfcrop.paper_relative_attention(q, g), lambda r: selfcrop.paper_window(r, (224, 224), 56))):
        w = pick(rel)
        assert (w.row, w.col, w.cells) == (4, 2, (2, 2)) and w.box == (56.0, 112.0, 112.0, 168.0)
    # without the generic map, the sink alone would draw the window
    assert selfcrop.choose_window(q / q.sum(), (224, 224)).row == 0


# ---- window vs evidence ---------------------------------------------------------------------------------------


def test_iou_hit_and_coverage():
    assert selfcrop.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert selfcrop.hit((0, 0, 10, 10), [(8, 8, 11, 11)]) and not selfcrop.hit((0, 0, 10, 10), [(9, 9, 13, 13)])
    # two overlapping boxes: union area 100 + 100 - 25 = 175; the window (0, 0, 10, 10) holds the first box
    assert selfcrop.coverage((0, 0, 10, 10), [(0, 0, 10, 10), (5, 5, 15, 15)]) == pytest.approx(100 / 175)
    assert selfcrop.coverage((20, 20, 30, 30), [(0, 0, 10, 10)]) == 0.0


def test_random_window_chances_by_hand():
    # a 50 px window in a 100 px image has its left end uniform on [0, 50]: a point at 25 is inside for left
    # ends in [0, 25] (1/2); in x and y independently -> 1/4. Over the box [20, 30], P(x) = x / 50, mean 1/2.
    hit_p, cov_p = selfcrop.random_window_chances((0, 0, 50, 50), [(20, 20, 30, 30)], (100, 100))
    assert hit_p == pytest.approx(0.25) and cov_p == pytest.approx(0.25)
    # a window as wide as the image always holds every x; a point at 75 in y: left ends in [25, 50] -> 1/2
    hit_p, cov_p = selfcrop.random_window_chances((0, 0, 100, 50), [(70, 70, 80, 80)], (100, 100))
    assert hit_p == pytest.approx(0.5) and cov_p == pytest.approx(0.5)
    # the whole image: certain
    assert selfcrop.random_window_chances((0, 0, 100, 100), [(1, 1, 2, 2)], (100, 100)) == (1.0, 1.0)


def test_random_window_chances_match_a_simulation():
    rng = np.random.default_rng(7)
    w, h, ww, wh = 400, 300, 120, 90
    boxes = [(50.0, 40.0, 110.0, 90.0), (90.0, 70.0, 150.0, 130.0)]  # overlapping
    hit_p, cov_p = selfcrop.random_window_chances((0, 0, ww, wh), boxes, (w, h))
    x0, y0 = rng.uniform(0, w - ww, 20000), rng.uniform(0, h - wh, 20000)
    hits = np.mean([selfcrop.hit((a, b, a + ww, b + wh), boxes) for a, b in zip(x0, y0, strict=True)])
    covs = np.mean([selfcrop.coverage((a, b, a + ww, b + wh), boxes) for a, b in zip(x0[:5000], y0[:5000],
                                                                                         strict=True)])
    assert hits == pytest.approx(hit_p, abs=0.01) and covs == pytest.approx(cov_p, abs=0.01)


def test_boxes_follow_the_view():
    cfg = ViewConfig(context=1.0, min_side=28, zoom=2.0)
    boxes = [(100, 50, 120, 90)]
    assert focus.boxes_in_view("full", boxes, (300, 200), cfg) == boxes
    # the crop region is (96, 50, 124, 90) (min side 28 about the centre), zoomed x2
    assert focus.boxes_in_view("crop", boxes, (300, 200), cfg) == [(8.0, 0.0, 48.0, 80.0)]
    assert focus.boxes_in_view("selfcrop", boxes, (300, 200), cfg, window=[110, 0, 210, 100]) == [(0, 100, 20, 180)]
    assert focus.boxes_in_view("selfcrop", boxes, (300, 200), cfg, window=[200, 0, 300, 100]) == []


# ---- summary rows ---------------------------------------------------------------------------------------------


def _rec(sid, view, correct, share=None, area=0.1, window=None, boxes=((0, 0, 10, 10),), evidence_area=0.03,
         size=(100, 100), layers=None):
    f = None
    if share is not None:
        f = {"layer": 1, "share": share, "area": area, "layers": layers or {"0": share / 2, "1": share}}
    return {"key": f"{sid}-{view}", "benchmark": "b", "sample_id": sid, "view": view, "correct": correct,
            "parsed": "A", "boxes": [list(b) for b in boxes], "focus": f, "window": window,
            "evidence_area": evidence_area if boxes else None, "image_size": list(size)}


def _rows(recs):
    from vopd_bench.analysis import summarize

    return {r["metric"]: r for r in summarize(recs, n_boot=400).query("category == 'all'").to_dict("records")}


def test_focus_rows_by_hand():
    # shares and areas; samples 1-2 right, 3-5 wrong; sample 6 has no focus, sample 7 an unusable map
    recs = [_rec("1", "full", True, 0.5, 0.1), _rec("2", "full", True, 0.3, 0.2), _rec("3", "full", False, 0.1, 0.1),
            _rec("4", "full", False, 0.2, 0.1), _rec("5", "full", False, 0.0, 0.05), _rec("6", "full", False)]
    recs.append({**_rec("7", "full", True), "focus": {"error": "the attention map has no mass"}})
    recs.append({**_rec("8", "full", True), "focus": {"early": 3.0, "middle": 2.0, "late": 1.0}})  # the old ratio
    rows = _rows(recs)
    share, area = np.array([0.5, 0.3, 0.1, 0.2, 0.0]), np.array([0.1, 0.2, 0.1, 0.1, 0.05])
    assert rows["focus_full_share"]["value"] == pytest.approx(share.mean()) and rows["focus_full_share"]["n"] == 5
    assert rows["focus_full_share"]["ci_low"] <= share.mean() <= rows["focus_full_share"]["ci_high"]
    assert rows["focus_full_share_median"]["value"] == pytest.approx(0.2)
    assert rows["focus_full_area"]["value"] == pytest.approx(area.mean())
    assert rows["focus_full_area_median"]["value"] == pytest.approx(0.1)
    assert rows["focus_full_lift"]["value"] == pytest.approx((share - area).mean())
    assert rows["focus_full_share_correct"]["value"] == pytest.approx(0.4) and rows["focus_full_share_correct"]["n"] == 2
    assert rows["focus_full_share_wrong"]["value"] == pytest.approx(0.1) and rows["focus_full_share_wrong"]["n"] == 3
    assert rows["focus_full_layer"]["value"] == 1
    assert rows["focus_full_errors"]["value"] == 1 and rows["focus_full_errors"]["n"] == 6
    assert not any(m.endswith("above1") for m in rows)


def test_correct_minus_wrong_is_stratified_by_evidence_area():
    # Large evidence draws attention and is answered right; small evidence draws little and is answered wrong.
    # Within each size bin right and wrong answers differ by +0.02 (small) and +0.10 (large); pooled, the
    # difference would mostly be the size effect.
    small, large = 0.003, 0.07  # bins 0.1-0.5% and 5-10%
    spec = [("1", True, 0.05, small), ("2", False, 0.03, small), ("3", False, 0.03, small), ("4", False, 0.03, small),
            ("5", True, 0.60, large), ("6", True, 0.60, large), ("7", True, 0.60, large), ("8", False, 0.50, large)]
    rows = _rows([_rec(sid, "full", ok, share, 0.01, evidence_area=ea) for sid, ok, share, ea in spec])
    pooled = np.mean([0.05, 0.6, 0.6, 0.6]) - np.mean([0.03, 0.03, 0.03, 0.5])
    stratified = (4 * 0.02 + 4 * 0.10) / 8
    assert rows["focus_full_correct_minus_wrong"]["value"] == pytest.approx(stratified)
    assert rows["focus_full_correct_minus_wrong"]["value"] < pooled
    assert rows["focus_full_correct_minus_wrong:0.1-0.5%"]["value"] == pytest.approx(0.02)
    assert rows["focus_full_correct_minus_wrong:5-10%"]["value"] == pytest.approx(0.10)
    assert rows["focus_full_correct_minus_wrong"]["n"] == 8
    # every resample of both bins has the same values on each side, so the interval is the point
    assert rows["focus_full_correct_minus_wrong:0.1-0.5%"]["ci_low"] == pytest.approx(0.02)
    # a bin with right answers only does not count
    rows = _rows([_rec(sid, "full", ok, share, 0.01, evidence_area=ea) for sid, ok, share, ea in spec]
                 + [_rec("9", "full", True, 0.9, 0.01, evidence_area=0.5)])
    assert rows["focus_full_correct_minus_wrong"]["value"] == pytest.approx(stratified)


def test_selfzoom_rows_by_hand():
    # full / crop / selfcrop outcomes per sample; windows vs the box (0, 0, 10, 10) in a 100 x 100 image
    outcomes = {"1": (0, 1, 1), "2": (0, 1, 0), "3": (0, 1, 0), "4": (1, 1, 1), "5": (0, 0, 1)}
    windows = {"1": [0, 0, 10, 10], "2": [0, 0, 20, 20], "3": [20, 20, 30, 30], "4": [5, 0, 15, 10],
               "5": [0, 0, 10, 5]}
    recs = []
    for sid, (f, c, s) in outcomes.items():
        recs += [_rec(sid, "full", bool(f)), _rec(sid, "crop", bool(c)), _rec(sid, "selfcrop", bool(s), window=windows[sid])]
    recs.append(_rec("6", "full", False, boxes=()))  # no evidence: full and selfcrop only, no window metrics
    recs.append(_rec("6", "selfcrop", True, window=[0, 0, 5, 5], boxes=()))
    rows = _rows(recs)
    assert rows["acc_selfcrop"]["value"] == pytest.approx(4 / 6)
    assert rows["gap_selfzoom"]["value"] == pytest.approx((4 - 1) / 6) and rows["gap_selfzoom"]["n"] == 6
    # on the five samples with all three views: (3 − 1) / (4 − 1)
    assert rows["selfzoom_recovery"]["value"] == pytest.approx(2 / 3) and rows["selfzoom_recovery"]["n"] == 5
    ious = [1.0, 100 / 400, 0.0, 50 / 150, 50 / 100]
    assert rows["selfcrop_iou"]["value"] == pytest.approx(np.mean(ious)) and rows["selfcrop_iou"]["n"] == 5
    # centre (5, 5): inside windows 1, 2, 4 and on the edge of 5
    assert rows["selfcrop_hit"]["value"] == pytest.approx(4 / 5)
    covs = [1.0, 1.0, 0.0, 0.5, 0.5]
    assert rows["selfcrop_coverage"]["value"] == pytest.approx(np.mean(covs))
    # chance of holding (5, 5) for a random window of side s in 100 px, per axis: min(5, 100 − s) / (100 − s)
    chance = [(5 / 90) ** 2, (5 / 80) ** 2, (5 / 90) ** 2, (5 / 90) ** 2, (5 / 90) * (5 / 95)]
    assert rows["selfcrop_hit_random"]["value"] == pytest.approx(np.mean(chance))
    assert rows["selfcrop_hit_over_random"]["value"] == pytest.approx(4 / 5 - np.mean(chance))
    assert rows["selfcrop_coverage_random"]["value"] < rows["selfcrop_coverage"]["value"]
    assert rows["n_no_evidence"]["value"] == 1  # the selfcrop view does not count as evidence


def test_before_after_focus_rows_pair_samples():
    before = [_rec("1", "full", True, 0.1, 0.05), _rec("2", "full", False, 0.3, 0.1), _rec("3", "full", False, 0.2)]
    after = [_rec("1", "full", True, 0.2, 0.05), _rec("2", "full", True, 0.5, 0.1)]
    rows = {r["metric"]: r for r in focus.before_after_rows(before, after, n_boot=200)}
    assert rows["focus_full_share"]["before"] == pytest.approx(0.2) and rows["focus_full_share"]["after"] == pytest.approx(0.35)
    assert rows["focus_full_share"]["delta"] == pytest.approx(0.15) and rows["focus_full_share"]["n"] == 2
    assert rows["focus_full_lift"]["before"] == pytest.approx(0.125) and rows["focus_full_lift"]["after"] == pytest.approx(0.275)


def test_layer_profile_and_the_focus_layers_command(tmp_path):
    from typer.testing import CliRunner

    from vopd_bench.cli_reports import app
    from vopd_bench.records import Record

    recs = [_rec(str(i), "full", True, 0.3, 0.1, layers={"0": 0.1, "1": 0.3, "2": 0.5 - i / 100}) for i in range(4)]
    recs.append(_rec("9", "crop", True, 0.9, 0.1, layers={"0": 0.9}))  # another view: not read
    rows = focus.layer_profile(recs, "full", n_boot=100)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert [r["lift"] for r in rows] == pytest.approx([0.0, 0.2, 0.385])
    with (tmp_path / "samples.jsonl").open("w") as f:
        for r in recs:
            f.write(Record.from_dict(r).to_json() + "\n")
    res = CliRunner().invoke(app, ["focus-layers", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "--focus-layer 2" in res.output


# ---- capture against transformers' eager attention ----------------------------------------------------------


def test_captured_row_equals_eager_attention(tiny_model_dir, one_thread):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vopd_bench.modeling import encode

    proc = AutoProcessor.from_pretrained(tiny_model_dir)
    proc.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    images = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (120, 260), (30, 30, 200))]
    inputs = encode(proc, images, ["What colour is the object in the picture?", "Shape?"])  # left-padded
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions  # per layer (batch, heads, q, k)
        model.set_attn_implementation("sdpa")
        with attention.capture_last_row(model) as rows:
            model(**inputs)
    assert sorted(rows) == list(range(len(ref)))
    for layer, full in enumerate(ref):
        torch.testing.assert_close(rows[layer], full[:, :, -1, :].float().mean(1), atol=1e-5, rtol=1e-4)
    assert torch.allclose(rows[0].sum(-1), torch.ones(2))
    assert model.model.language_model.layers[0].self_attn.config is model.config.text_config  # restored


# ---- a planted map through the backend and the runner -------------------------------------------------------

# On the toy's 8 x 8 token grid (224 x 224 images): a sink at (0, 0) in every pass, and a block at rows 4-5,
# cols 2-3 in the question passes only (`plan`: "block"), or a question map that is all zero or NaN.
SINK, BLOCK = 50.0, 10.0
BLOCK_PX = [56, 112, 112, 168]  # the block's cells in pixels


def _planted(image_token_id, state):
    def last_row(module, query, key, attention_mask, scaling):
        import torch

        ids = module._planted_ids
        rows = []
        for b in range(ids.shape[0]):
            w = torch.zeros(ids.shape[1])
            pos = (ids[b] == image_token_id).nonzero().flatten()
            grid = torch.ones(8, 8)
            grid[0, 0] = SINK
            if not state["generic"]:
                grid[4:6, 2:4] = BLOCK
                if state["plan"] == "zero":
                    grid[:] = 0.0
                elif state["plan"] == "nan":
                    grid[3, 3] = float("nan")
            w[pos] = grid.flatten()
            total = w.sum()
            rows.append(w / total if total > 0 else w)
        return torch.stack(rows)
    return last_row


@pytest.fixture
def planted_toy(monkeypatch, one_thread):
    """The toy, with the captured row replaced by the planted map (the model still answers normally). The
    backend's `state` says which map the next pass gets and keeps what it was asked."""
    from vopd_bench.backends.hf import HFBackend

    backend = HFBackend("toy")
    state = {"generic": False, "plan": "block", "prefills": [], "answers": []}
    backend.state = state
    monkeypatch.setattr(attention, "_last_row", _planted(backend.model.config.image_token_id, state))
    prefill, generate = backend.prefill_attention, backend.generate

    def planted_prefill(requests, gen):  # the generic pass is the one whose prompt opens with the generic sentence
        state["generic"] = requests[0].prompt.startswith(selfcrop.GENERIC_PROMPT)
        state["prefills"] += [r.prompt for r in requests]
        try:
            return prefill(requests, gen)
        finally:
            state["generic"] = False

    def counted_generate(requests, gen):
        state["answers"] += [len(r.images) for r in requests]
        return generate(requests, gen)

    monkeypatch.setattr(backend, "prefill_attention", planted_prefill)
    monkeypatch.setattr(backend, "generate", counted_generate)

    def remember_ids(model, args, kwargs):  # the planted map needs each row's token ids (prefill calls only)
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            for m in attention.text_attention_modules(model):
                m._planted_ids = ids

    handle = backend.model.register_forward_pre_hook(remember_ids, with_kwargs=True)
    yield backend
    handle.remove()


def _run_planted(backend, tmp_path, bbox, method, **kw):
    from vopd_bench.runner import GapReportConfig, run_gap_report

    Image.new("RGB", (224, 224), (128, 128, 128)).save(tmp_path / "img.png")
    row = {"id": "s1", "image": "img.png", "question": "What colour is the triangle?", "options": ["red", "blue"],
           "answer": "A", "bbox": bbox}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    cfg = GapReportConfig(model="toy", benchmarks=[f"local:{tmp_path / 'd.jsonl'}"], views=("full", "selfcrop"),
                          out=str(tmp_path / "out"), quiet=True, focus=True, max_new_tokens=2, selfcrop_method=method,
                          selfcrop_window=56 if method == "paper" else None, **kw)
    result = run_gap_report(cfg, backend=backend)
    summary = {r["metric"]: r["value"] for r in result.summary.query("category == 'all'").to_dict("records")}
    return {r.view: r for r in result.records}, summary


def _planted_question_map():
    q = np.ones((8, 8))
    q[0, 0], q[4:6, 2:4] = SINK, BLOCK
    return q


def test_planted_map_gives_the_defined_share_window_and_crop_grid(planted_toy, tmp_path):
    recs, s = _run_planted(planted_toy, tmp_path, BLOCK_PX, "grid")  # the box is exactly the block's cells
    q = _planted_question_map()
    assert recs["full"].focus["share"] == pytest.approx(q[4:6, 2:4].sum() / q.sum())
    assert recs["full"].focus["area"] == pytest.approx(4 / 64) and recs["full"].focus["layer"] == 1
    assert recs["selfcrop"].window == BLOCK_PX
    # the grid method: the bare generic sentence, and the zoomed crop alone is shown
    assert planted_toy.state["prefills"][1] == selfcrop.GENERIC_PROMPT
    assert planted_toy.state["answers"] == [1, 1]
    # the selfcrop answer looked at the window, zoomed: the evidence fills it, share and area are exactly 1
    assert recs["selfcrop"].focus["share"] == 1.0 and recs["selfcrop"].focus["area"] == 1.0
    assert s["selfcrop_iou"] == 1.0 and s["selfcrop_hit"] == 1.0 and s["selfcrop_coverage"] == 1.0
    assert s["focus_full_share"] == pytest.approx(40 / 149)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Self-zoom" in md and "## Focus" in md and "focus.png" in md


def test_planted_map_through_the_paper_method(planted_toy, tmp_path):
    recs, s = _run_planted(planted_toy, tmp_path, BLOCK_PX, "paper")
    # with a 56 px base on 28 px cells, the 2-cell window on the block scores (40 - 22) / 4 (test above)
    assert recs["selfcrop"].window == BLOCK_PX
    question, generic = planted_toy.state["prefills"]
    # the generic prompt carries the question's options and answer format; only the first sentence differs
    assert generic.replace(selfcrop.GENERIC_PROMPT, "") == question.replace("What colour is the triangle?", "")
    assert "(B) blue" in generic
    # the answer saw the full image and the crop; a two-image prompt records no focus
    assert planted_toy.state["answers"] == [1, 2] and recs["selfcrop"].focus is None
    assert s["selfcrop_hit"] == 1.0 and "focus_selfcrop_share" not in s


@pytest.mark.parametrize("method", ["grid", "paper"])
def test_window_follows_the_attention_not_the_evidence(planted_toy, tmp_path, method):
    """The leak test: the evidence box (top right) is far from where the planted attention points (the block);
    a window that peeked at the box would land on it."""
    elsewhere = [168, 0, 224, 56]
    recs, s = _run_planted(planted_toy, tmp_path, elsewhere, method)
    assert recs["selfcrop"].window == BLOCK_PX
    assert s["selfcrop_hit"] == 0.0 and s["selfcrop_coverage"] == 0.0
    # the full view's share is measured on the box: 4 cells of weight 1 out of 149
    assert recs["full"].focus["share"] == pytest.approx(4 / 149)
    assert s["focus_full_lift"] == pytest.approx(4 / 149 - 4 / 64)


@pytest.mark.parametrize("plan, method, reason", [("zero", "paper", "no mass"), ("nan", "grid", "non-finite")])
def test_unusable_attention_is_a_per_sample_error_not_a_window(planted_toy, tmp_path, plan, method, reason):
    planted_toy.state["plan"] = plan
    recs, s = _run_planted(planted_toy, tmp_path, BLOCK_PX, method)
    sc = recs["selfcrop"]
    assert sc.window is None and sc.response is None and sc.error_kind == "sample"
    assert sc.error.startswith("no self-zoom window: ") and reason in sc.error
    assert planted_toy.state["answers"] == [1]  # the full view only: nothing was asked on a made-up window
    assert reason in recs["full"].focus["error"] and recs["full"].correct is not None  # the answer itself stands
    assert s["n_errors_selfcrop"] == 1 and s["focus_full_errors"] == 1 and "focus_full_share" not in s


def test_bad_options_are_refused_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from vopd_bench.cli import app

    res = CliRunner().invoke(app, ["gap-report", "toy", "--views", "full,selfcrop", "--selfcrop-method", "best",
                                   "--out", str(tmp_path / "a"), "-q"])
    assert isinstance(res.exception, VopdError) and "unknown --selfcrop-method 'best'" in str(res.exception)
    res = CliRunner().invoke(app, ["gap-report", "toy", "--focus", "--focus-layer", "7", "--limit", "1",
                                   "--out", str(tmp_path / "b"), "-q"])
    assert isinstance(res.exception, VopdError)
    assert str(res.exception) == "--focus-layer 7 is not an attention layer of this model (its layers: 0–2)"


def test_gallery_draws_the_self_zoom_window(tmp_path):
    import base64
    import io

    from vopd_bench import html_report

    Image.new("RGB", (320, 320), (255, 255, 255)).save(tmp_path / "img.png")
    base = {"benchmark": "b", "sample_id": "1", "image": str(tmp_path / "img.png"), "question": "q?",
            "options": ["x", "y"], "answer": "A", "boxes": [[10, 10, 30, 30]], "image_size": [320, 320]}
    recs = [{**base, "key": "f", "view": "full", "correct": False, "parsed": "B"},
            {**base, "key": "c", "view": "crop", "correct": True, "parsed": "A"},
            {**base, "key": "s", "view": "selfcrop", "correct": True, "parsed": "A", "window": [160, 160, 320, 320]}]
    (case,), _ = html_report.gallery_cases(recs)
    assert case.window == [160, 160, 320, 320]
    full_uri, _ = html_report.case_images(case, ViewConfig())
    thumb = Image.open(io.BytesIO(base64.b64decode(full_uri.split(",", 1)[1]))).convert("RGB")
    r, g, b = thumb.getpixel((240, 161))  # on the window's top edge
    assert r > 200 and 100 < g < 180 and b < 80
    assert thumb.getpixel((240, 100)) == pytest.approx((255, 255, 255), abs=8)  # outside it: untouched


# ---- what cannot expose attention ---------------------------------------------------------------------------


def test_openai_backend_refuses_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from vopd_bench.cli import app

    # No server listens there: the refusal comes before any connection is tried.
    res = CliRunner().invoke(app, ["gap-report", "toy", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
                                   "--views", "full,selfcrop", "--out", str(tmp_path), "-q"])
    assert isinstance(res.exception, VopdError)
    assert str(res.exception) == ("the openai backend cannot expose attention: --focus and the selfcrop view need "
                                  "--backend hf")


def test_unsupported_family_refuses_in_one_line():
    class Config:
        model_type = "llava_onevision"

    class Model:
        config = Config()

    class Backend:
        name = "hf"
        model = Model()

        def prefill_attention(self, requests, gen):  # pragma: no cover - never reached
            return []

    with pytest.raises(VopdError, match="not available for model family 'llava_onevision'") as e:
        attention.enable(Backend(), focus=False)
    assert "\n" not in str(e.value)


def test_last_row_by_hand_with_either_mask_form():
    import torch

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)  # 4 query heads share 2 kv heads
    pad = torch.tensor([[0, 1, 1], [1, 1, 1]])  # row 0 is left-padded by one key
    expected = torch.zeros(2, 3)
    for b in range(2):
        keep = pad[b].bool()
        for h in range(4):
            s = (k[b, h // 2] @ q[b, h, -1]) * 0.3
            expected[b, keep] += torch.softmax(s[keep], 0) / 4
    four_d = pad[:, None, None, :].bool().expand(2, 1, 3, 3)
    additive = torch.zeros(2, 1, 3, 3).masked_fill(~four_d, float("-inf"))
    for mask in (pad, four_d, additive):
        torch.testing.assert_close(attention._last_row(None, q, k, mask, 0.3), expected)
