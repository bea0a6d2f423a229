"""The token-to-region map of each supported family, checked against the processor's own grid
(`image_grid_thw`) and the model's own 3-D rope positions of the image tokens, and the focus/selfcrop path
end to end on each family's tiny checkpoint."""

import pytest
import torch
from PIL import Image
from tiny_fixtures import tiny_family_dir  # noqa: F401

from vopd_bench.modeling import encode, load_model
from vopd_bench.token_grid import token_grid

FAMILIES = ("qwen2.5-vl", "qwen3-vl", "qwen3.5")


def _check_against_model_grid(model, processor):
    images = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (120, 260), (30, 30, 200))]
    inputs = encode(processor, images, ["What colour is the object?", "Shape?"])
    grid = token_grid(model, processor, inputs)
    merge = processor.image_processor.merge_size
    expected = [(int(h) // merge, int(w) // merge) for _, h, w in inputs["image_grid_thw"].tolist()]
    assert grid.grids == expected and grid.grids[0] != grid.grids[1]
    # The model's own 3-D rope index places each image token at (t, row, col) on the merged grid.
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs.get("mm_token_type_ids"),
                                        image_grid_thw=inputs["image_grid_thw"],
                                        attention_mask=inputs["attention_mask"])
    for i, (p, (rows, cols)) in enumerate(zip(grid.positions, grid.grids, strict=True)):
        h, w = pos[1, i, p], pos[2, i, p]
        k = torch.arange(rows * cols)
        assert torch.equal(h - h.min(), k // cols) and torch.equal(w - w.min(), k % cols)


def _focus_selfcrop_end_to_end(model_dir, out):
    from vopd_bench.runner import GapReportConfig, run_gap_report

    cfg = GapReportConfig(model=str(model_dir), benchmarks=["synthetic"], views=("full", "selfcrop"), limit=2,
                          out=str(out), quiet=True, focus=True, max_new_tokens=2)
    result = run_gap_report(cfg)
    metrics = set(result.summary["metric"])
    assert {"acc_selfcrop", "gap_selfzoom", "focus_full_share", "selfcrop_iou", "selfcrop_hit_random"} <= metrics
    windows = [r.window for r in result.records if r.view == "selfcrop"]
    assert len(windows) == 2 and all(w and w[2] > w[0] and w[3] > w[1] for w in windows)


def test_qwen2_vl_map_matches_the_model_grid(tiny_model_dir, one_thread):
    model, processor = load_model(str(tiny_model_dir))
    _check_against_model_grid(model, processor)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_map_and_end_to_end(family, tmp_path, one_thread, tiny_family_dir):  # noqa: F811
    path = tiny_family_dir(family)
    model, processor = load_model(str(path))
    _check_against_model_grid(model, processor)
    _focus_selfcrop_end_to_end(path, tmp_path / "out")


def test_family_without_a_map_is_refused_in_one_line(tmp_path, tiny_family_dir):  # noqa: F811
    from typer.testing import CliRunner

    from vopd_bench.cli import app
    from vopd_bench.errors import VopdError

    path = tiny_family_dir("llava-onevision")  # anyres tiling: no token-to-region map here
    res = CliRunner().invoke(app, ["gap-report", str(path), "--focus", "--limit", "1", "--out", str(tmp_path / "o"),
                                   "-q"])
    assert isinstance(res.exception, VopdError) and "\n" not in str(res.exception)
    assert "not available for model family 'llava_onevision'" in str(res.exception)
