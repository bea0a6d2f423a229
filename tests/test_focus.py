"""--focus and the selfcrop view: the definitions on hand-computed maps, the capture against transformers' own
eager attention, and a planted attention map followed through the real backend and runner."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from vopd_bench import attention, focus, selfcrop
from vopd_bench.attention import ImageAttention
from vopd_bench.errors import VopdError
from vopd_bench.views import ViewConfig

# ---- definitions on hand-made maps ----------------------------------------------------------------------------


def test_ratio_is_attention_share_over_token_share():
    att = np.ones((4, 4))
    att[0, :2] = 7.0  # cells (0,0) and (0,1) hold 14 of 28
    # a 200 x 100 image on a 4 x 4 grid: cells are 50 x 25 px; the box covers exactly those two cells
    assert attention.attention_ratio(att, [(0, 0, 100, 25)], (200, 100)) == pytest.approx((14 / 28) / (2 / 16))
    assert attention.attention_ratio(np.ones((4, 4)), [(13, 7, 91, 66)], (200, 100)) == pytest.approx(1.0)
    assert attention.attention_ratio(att, [(0, 0, 0.0001, 0.0001)], (200, 100)) is None  # covers no lattice point


def test_partial_cells_count_by_covered_fraction_and_overlaps_once():
    cov = attention.cell_coverage([(0, 0, 25, 25), (0, 0, 25, 25), (75, 0, 100, 50)], (100, 100), (2, 2))
    # cells are 50 px: the first box (twice) covers a quarter of cell (0,0), the last half of cell (0,1)
    np.testing.assert_allclose(cov, [[0.25, 0.5], [0.0, 0.0]])


def test_bands_are_thirds_of_the_layers():
    assert [attention.band_slice(9, b) for b in attention.BANDS] == [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert [attention.band_slice(3, b) for b in attention.BANDS] == [slice(0, 1), slice(1, 2), slice(2, 3)]
    maps = np.stack([np.full((2, 2), float(i)) for i in range(6)])
    att = ImageAttention(tuple(range(6)), maps, (10, 10))
    assert att.band("middle")[0, 0] == 2.5 and att.band("late")[0, 0] == 4.5


def test_relative_attention_divides_normalised_maps():
    q = np.array([[2.0, 2.0], [4.0, 0.0]])
    g = np.array([[1.0, 1.0], [1.0, 1.0]])
    eps = 0.04
    rel = selfcrop.relative_attention(q, g, eps)
    expected = (q / 8) / (g / 4 + eps / 4)
    np.testing.assert_allclose(rel, expected)


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


def test_window_is_the_sharpest_maximum():
    rng = np.random.default_rng(3)
    for _ in range(20):
        rel = rng.random((6, 9)) ** 4
        w = selfcrop.choose_window(rel, (900, 600), (0.25, 0.5, 0.75))
        sharp, r, c, side = _brute_force_window(rel, (0.25, 0.5, 0.75))
        assert (w.row, w.col, w.side) == (r, c, side) and w.sharpness == pytest.approx(sharp)
        assert w.box == pytest.approx((c * 100, r * 100, (c + side) * 100, (r + side) * 100))


def test_planted_block_wins_over_a_sink_that_the_generic_map_shares():
    q, g = np.ones((8, 8)), np.ones((8, 8))
    q[0, 0] = g[0, 0] = 50.0  # a sink: attended whatever is asked
    q[4:6, 2:4] = 10.0  # the question's evidence
    rel = selfcrop.relative_attention(q, g)
    w = selfcrop.choose_window(rel, (224, 224))
    assert (w.row, w.col, w.side) == (4, 2, 2)
    assert w.box == (56.0, 112.0, 112.0, 168.0)
    # without the generic map, the sink alone would draw the window
    assert selfcrop.choose_window(q / q.sum(), (224, 224)).row == 0


def test_iou_and_hit():
    assert selfcrop.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert selfcrop.hit((0, 0, 10, 10), [(8, 8, 11, 11)]) and not selfcrop.hit((0, 0, 10, 10), [(9, 9, 13, 13)])


def test_boxes_follow_the_view():
    cfg = ViewConfig(context=1.0, min_side=28, zoom=2.0)
    boxes = [(100, 50, 120, 90)]
    assert focus.boxes_in_view("full", boxes, (300, 200), cfg) == boxes
    # the crop region is (96, 50, 124, 90) (min side 28 about the centre), zoomed x2
    assert focus.boxes_in_view("crop", boxes, (300, 200), cfg) == [(8.0, 0.0, 48.0, 80.0)]
    assert focus.boxes_in_view("selfcrop", boxes, (300, 200), cfg, window=[110, 0, 210, 100]) == [(0, 100, 20, 180)]
    assert focus.boxes_in_view("selfcrop", boxes, (300, 200), cfg, window=[200, 0, 300, 100]) == []


# ---- summary rows ---------------------------------------------------------------------------------------------


def _rec(sid, view, correct, ratio=None, window=None, boxes=((0, 0, 10, 10),)):
    return {"key": f"{sid}-{view}", "benchmark": "b", "sample_id": sid, "view": view, "correct": correct,
            "parsed": "A", "boxes": [list(b) for b in boxes],
            "focus": None if ratio is None else {"early": ratio + 1, "middle": ratio, "late": ratio - 1},
            "window": window}


def test_focus_rows_by_correctness_and_share_above_one():
    from vopd_bench.analysis import summarize

    recs = [_rec("1", "full", True, 3.0), _rec("2", "full", True, 2.0), _rec("3", "full", False, 0.5),
            _rec("4", "full", False, 1.5), _rec("5", "full", False)]  # sample 5: no focus recorded
    rows = {r["metric"]: r for r in summarize(recs, n_boot=200).query("category == 'all'").to_dict("records")}
    assert rows["focus_full"]["value"] == pytest.approx(7 / 4) and rows["focus_full"]["n"] == 4
    assert rows["focus_full"]["ci_low"] <= 7 / 4 <= rows["focus_full"]["ci_high"]
    assert rows["focus_full_early"]["value"] == pytest.approx(11 / 4)
    assert rows["focus_full_late"]["value"] == pytest.approx(3 / 4)
    assert rows["focus_full_correct"]["value"] == pytest.approx(2.5) and rows["focus_full_correct"]["n"] == 2
    assert rows["focus_full_wrong"]["value"] == pytest.approx(1.0) and rows["focus_full_wrong"]["n"] == 2
    assert rows["focus_full_above1"]["value"] == pytest.approx(3 / 4)


def test_selfzoom_rows_by_hand():
    from vopd_bench.analysis import summarize

    # full / crop / selfcrop outcomes per sample; windows vs the box (0, 0, 10, 10)
    outcomes = {"1": (0, 1, 1), "2": (0, 1, 0), "3": (0, 1, 0), "4": (1, 1, 1), "5": (0, 0, 1)}
    windows = {"1": [0, 0, 10, 10], "2": [0, 0, 20, 20], "3": [20, 20, 30, 30], "4": [5, 0, 15, 10],
               "5": [0, 0, 10, 5]}
    recs = []
    for sid, (f, c, s) in outcomes.items():
        recs += [_rec(sid, "full", bool(f)), _rec(sid, "crop", bool(c)), _rec(sid, "selfcrop", bool(s), window=windows[sid])]
    recs.append(_rec("6", "full", False, boxes=()))  # no evidence: full and selfcrop only, no IoU
    recs.append(_rec("6", "selfcrop", True, window=[0, 0, 5, 5], boxes=()))
    rows = {r["metric"]: r for r in summarize(recs, n_boot=200).query("category == 'all'").to_dict("records")}
    assert rows["acc_selfcrop"]["value"] == pytest.approx(4 / 6)
    assert rows["gap_selfzoom"]["value"] == pytest.approx((4 - 1) / 6) and rows["gap_selfzoom"]["n"] == 6
    # on the five samples with all three views: (3 − 1) / (4 − 1)
    assert rows["selfzoom_recovery"]["value"] == pytest.approx(2 / 3) and rows["selfzoom_recovery"]["n"] == 5
    ious = [1.0, 100 / 400, 0.0, 50 / 150, 50 / 100]
    assert rows["selfcrop_iou"]["value"] == pytest.approx(np.mean(ious)) and rows["selfcrop_iou"]["n"] == 5
    # centre (5, 5): inside windows 1, 2, 4 and on the edge of 5
    assert rows["selfcrop_hit"]["value"] == pytest.approx(4 / 5)
    assert rows["n_no_evidence"]["value"] == 1  # the selfcrop view does not count as evidence


def test_before_after_focus_rows_pair_samples():
    before = [_rec("1", "full", True, 1.0), _rec("2", "full", False, 3.0), _rec("3", "full", False, 2.0)]
    after = [_rec("1", "full", True, 2.0), _rec("2", "full", True, 5.0)]
    rows = {r["metric"]: r for r in focus.before_after_rows(before, after, n_boot=200)}
    assert rows["focus_full"]["before"] == pytest.approx(2.0) and rows["focus_full"]["after"] == pytest.approx(3.5)
    assert rows["focus_full"]["delta"] == pytest.approx(1.5) and rows["focus_full"]["n"] == 2
    assert rows["focus_full_above1"]["before"] == pytest.approx(0.5) and rows["focus_full_above1"]["after"] == 1.0


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

# On the toy's 8 x 8 token grid (224 x 224 images): a sink at (0, 0) in every pass, and the evidence block
# rows 4-5, cols 2-3 in the question passes only.
SINK, BLOCK = 50.0, 10.0


def _planted(image_token_id, generic_len):
    def last_row(module, query, key, attention_mask, scaling):
        import torch

        ids = module._planted_ids
        rows = []
        for b in range(ids.shape[0]):
            w = torch.zeros(ids.shape[1])
            pos = (ids[b] == image_token_id).nonzero().flatten()
            grid = torch.ones(8, 8)
            grid[0, 0] = SINK
            if ids.shape[1] != generic_len:
                grid[4:6, 2:4] = BLOCK
            w[pos] = grid.flatten()
            rows.append(w / w.sum())
        return torch.stack(rows)
    return last_row


@pytest.fixture
def planted_toy(monkeypatch, one_thread):
    """The toy, with the captured row replaced by the planted map (the model still answers normally)."""
    from vopd_bench.backends.hf import HFBackend
    from vopd_bench.modeling import chat_text

    backend = HFBackend("toy")
    tid = backend.model.config.image_token_id
    generic = backend.processor(text=[chat_text(backend.processor, selfcrop.GENERIC_PROMPT)],
                                images=[Image.new("RGB", (224, 224))], return_tensors="pt")["input_ids"].shape[1]
    monkeypatch.setattr(attention, "_last_row", _planted(tid, generic))

    backend.prefills = []  # the prompts' lengths, one per prefill pass

    def remember_ids(model, args, kwargs):  # the planted map needs each row's token ids (prefill calls only)
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            backend.prefills.append(ids.shape[1])
            for m in attention.text_attention_modules(model):
                m._planted_ids = ids

    handle = backend.model.register_forward_pre_hook(remember_ids, with_kwargs=True)
    yield backend
    handle.remove()


def test_planted_map_gives_the_defined_ratio_window_and_crop(planted_toy, tmp_path):
    from vopd_bench.runner import GapReportConfig, run_gap_report

    Image.new("RGB", (224, 224), (128, 128, 128)).save(tmp_path / "img.png")
    row = {"id": "s1", "image": "img.png", "question": "What colour is the triangle?", "options": ["red", "blue"],
           "answer": "A", "bbox": [56, 112, 112, 168]}  # exactly the planted block's cells
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    cfg = GapReportConfig(model="toy", benchmarks=[f"local:{tmp_path / 'd.jsonl'}"], views=("full", "selfcrop"),
                          out=str(tmp_path / "out"), quiet=True, focus=True, max_new_tokens=2)
    result = run_gap_report(cfg, backend=planted_toy)
    recs = {r.view: r for r in result.records}
    # full: one generation; selfcrop: the question and the generic prompt (prefill only), then one generation
    generic = planted_toy.prefills[2]
    assert len(planted_toy.prefills) == 4 and planted_toy.prefills[1] == planted_toy.prefills[3] != generic
    q = np.ones((8, 8))
    q[0, 0], q[4:6, 2:4] = SINK, BLOCK
    expected = (q[4:6, 2:4].sum() / q.sum()) / (4 / 64)
    assert recs["full"].focus == pytest.approx({"early": expected, "middle": expected, "late": expected})
    assert recs["selfcrop"].window == [56, 112, 112, 168]
    # the selfcrop answer looked at the window, zoomed: the evidence fills it, so the ratio is exactly 1
    assert recs["selfcrop"].focus["middle"] == pytest.approx(1.0)
    s = {r["metric"]: r["value"] for r in result.summary.query("category == 'all'").to_dict("records")}
    assert s["selfcrop_iou"] == 1.0 and s["selfcrop_hit"] == 1.0 and s["focus_full"] == pytest.approx(expected)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Self-zoom" in md and "## Focus" in md and "focus.png" in md


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


def test_unknown_band_is_refused():
    with pytest.raises(ValueError, match="unknown layer band"):
        attention.band_slice(3, "top")
    assert math.isfinite(attention.attention_ratio(np.ones((2, 2)), [(0, 0, 1, 1)], (2, 2)))


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
