"""A large JPEG asked only under the full view is decoded at a reduced size that still covers the model's pixel
budget; a sample that also needs its crop is decoded in full, and records keep the file's own size either way."""

import json

from PIL import Image

from vopd_bench.backends.base import Response
from vopd_bench.families import QWEN_VL
from vopd_bench.runner import GapReportConfig, run_gap_report

W, H, BUDGET = 1600, 1200, 50_000  # a 1.92 MP photo; the model keeps at most 50k pixels of it


class Recorder:
    name = "recorder"
    preferred_batch_size = 0
    view_pixels = BUDGET

    def __init__(self):
        self.sizes: list[tuple[int, int]] = []

    def fingerprint(self) -> str:
        return "recorder"

    def generate(self, requests, gen):
        self.sizes += [r.image.size for r in requests]
        return [Response("A") for _ in requests]

    def close(self) -> None:
        pass


def _dataset(tmp_path):
    Image.new("RGB", (W, H), (200, 40, 40)).save(tmp_path / "photo.jpg", quality=90)
    row = {"id": "q", "image": "photo.jpg", "question": "Colour?", "options": ["red", "blue"], "answer": "A",
           "bbox": [100, 100, 300, 260]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    return tmp_path / "d.jsonl"


def test_full_view_only_is_drafted_and_records_keep_the_file_size(tmp_path):
    data, backend = _dataset(tmp_path), Recorder()
    cfg = GapReportConfig(model="recorder", benchmarks=[f"local:{data}"], views=("full",), out=str(tmp_path / "o"),
                          quiet=True)
    (rec,) = run_gap_report(cfg, backend=backend).records
    (w, h), = backend.sizes
    # JPEG scales by 1/2, 1/4 or 1/8: 1/4 (400x300 = 120k px) is the smallest that still holds 50k pixels
    assert (w, h) == (W // 4, H // 4)
    assert rec.image_size == [W, H] and rec.boxes == [[100, 100, 300, 260]]


def test_a_sample_that_needs_its_crop_is_decoded_in_full(tmp_path):
    data, backend = _dataset(tmp_path), Recorder()
    cfg = GapReportConfig(model="recorder", benchmarks=[f"local:{data}"], views=("full", "crop"),
                          out=str(tmp_path / "o"), quiet=True)
    run_gap_report(cfg, backend=backend)
    assert (W, H) in backend.sizes and len(backend.sizes) == 2


def test_qwen_budget_is_read_from_the_processor(tiny_model_dir):
    from transformers import AutoProcessor

    ip = AutoProcessor.from_pretrained(tiny_model_dir).image_processor
    assert QWEN_VL.pixel_budget(ip) == ip.size["longest_edge"] > 0
