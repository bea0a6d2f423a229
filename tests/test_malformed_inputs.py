"""An adversarial user's inputs: every malformed dataset file either stops the run with one clean line, or loads
its good rows with the bad ones recorded; every malformed image is one sample error, never a crash or a decode of
a decompression bomb."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile
from report_fixtures import SaysBackend

from vopd_bench import benchmarks, images
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.images import load_image
from vopd_bench.runner import GapReportConfig, run_gap_report
from vopd_bench.samples import BadSample, Sample

ROW = {"id": "r1", "image": "a.png", "question": "What colour is it?", "options": ["red", "green"], "answer": "B"}
ROW2 = {**ROW, "id": "r2"}


def _jsonl(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


# (file name, content, expected): a VopdError message pattern, or (good rows, bad rows).
FILES: list[tuple[str, str | bytes, str | tuple[int, int]]] = [
    ("empty.jsonl", "", "the file is empty"),
    ("blank.jsonl", "\n   \n\t\n", "only blank lines"),
    ("garbage.jsonl", "{oops\nnot json at all\n", r"none of its 2 row\(s\) is usable \(first, line1: line 1 is not"),
    ("binary.jsonl", b"\xff\xfe\x00\x01\n\x80\x81\n", "none of its 2 row"),
    ("array.jsonl", json.dumps([ROW, ROW2]), (2, 0)),  # one JSON array: read as rows
    ("pretty-array.jsonl", json.dumps([ROW, ROW2], indent=2), (2, 0)),
    ("array-mixed.jsonl", json.dumps([ROW, 7, "x"]), (1, 2)),
    ("empty-array.jsonl", "[]", "empty JSON array"),
    ("array-of-numbers.jsonl", "[1, 2, 3]", "none of its 3 row"),
    ("broken-array.jsonl", '[{"id": "r1",\n "image": "a.png"', "none of its 2 row"),
    ("pretty-object.jsonl", json.dumps(ROW, indent=1), "none of its"),
    ("bom.jsonl", "\ufeff" + _jsonl(ROW), (1, 0)),
    ("wrong-types.jsonl", _jsonl(ROW, {**ROW2, "question": 42}, {**ROW, "id": "r3", "image": [1, 2]},
                                 {**ROW, "id": "r4", "options": {"a": 1}}, {**ROW, "id": "r5", "bbox": "abc"},
                                 {**ROW, "id": "r6", "answer_type": ["mcq"]}), (2, 4)),  # r3's image fails later
    ("no-question-column.jsonl", _jsonl({"id": 1, "image": "a.png"}, {"id": 2, "image": "a.png"}),
     "missing field 'question'"),
    ("empty.csv", "", "the file is empty"),
    ("header-only.csv", "id,image,question,answer\n", "no rows to evaluate"),
    ("ragged.csv", 'id,image,question\n1,a.png,"Q?"\n2,a.png,"Q?",extra,cells\n', "cannot read as csv"),
    ("good.csv", 'id,image,question,options,answer\n1,a.png,Q?,"[""x"", ""y""]",A\n2,a.png,,,\n', (1, 1)),
    ("bom.csv", "\ufeffid,image,question\nq1,a.png,Q?\n", (1, 0)),
    ("latin1.csv", "id,image,question\nq1,a.png,caf\xe9?\n".encode("latin-1"), "cannot read as csv"),
    ("tabs.csv", "id\timage\tquestion\nq1\ta.png\tQ?\n", "missing field"),
    ("empty.parquet", b"", "the file is empty"),
    ("not.parquet", b"PAR1 but not really", "cannot read as parquet"),
    ("zero-rows.parquet", _parquet(pd.DataFrame({"id": pd.Series([], dtype=str), "image": pd.Series([], dtype=str),
                                                 "question": pd.Series([], dtype=str)})), "no rows to evaluate"),
    ("int-columns.parquet", _parquet(pd.DataFrame({"id": [1, 2], "image": [5, 6], "question": [7, 8]})),
     "missing field 'question'"),
    ("object.json", json.dumps({"a": 1, "b": 2}), "cannot read as json"),
    ("rows.json", json.dumps([ROW, ROW2]), (2, 0)),
]


@pytest.mark.parametrize(("name", "content", "expected"), FILES, ids=[f[0] for f in FILES])
def test_malformed_dataset_files(tmp_path: Path, name: str, content: str | bytes, expected) -> None:
    Image.new("RGB", (32, 24), (0, 200, 0)).save(tmp_path / "a.png")
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    if isinstance(expected, str):
        with pytest.raises(VopdError, match=expected) as info:
            benchmarks.load(f"local:{path}")
        assert not isinstance(info.value, SampleError) and "\n" not in str(info.value)
        assert str(path) in str(info.value)  # the line names the file
    else:
        samples = benchmarks.load(f"local:{path}").samples
        good = [s for s in samples if isinstance(s, Sample)]
        bad = [s for s in samples if isinstance(s, BadSample)]
        assert (len(good), len(bad)) == expected, [b.error for b in bad]
        assert all("\n" not in b.error for b in bad)
        if name.startswith("bom"):  # the byte-order mark is not part of the first field's name
            assert good[0].id in ("r1", "q1")


def test_a_dataset_whose_image_files_all_miss_is_a_run_level_error(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(_jsonl(ROW, {**ROW2, "image": "elsewhere/b.png"}), encoding="utf-8")
    with pytest.raises(VopdError, match=r"none of its 2 image file\(s\) exists \(first: .*a.png\)"):
        benchmarks.load(f"local:{path}")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")  # one image present: the run goes on, the other is per sample
    assert len(benchmarks.load(f"local:{path}").samples) == 2


def _png_bomb(side: int) -> bytes:
    """A 1-bit PNG that declares side × side pixels: all zeros, so it compresses to a few tens of KB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _jpeg_header_only(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header is rewritten to declare width × height (the data stays tiny)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


BAD_IMAGES: list[tuple[str, bytes, str]] = [
    ("bomb.png", _png_bomb(20_000), r"declares 20000x20000 = 400 MP, over the 100 MP limit"),
    ("huge-header.jpg", _jpeg_header_only(60_000, 40_000), "over the 100 MP limit"),
    ("empty.png", b"", "corrupt or unreadable"),
    ("text.png", b"hello, I am not an image", "corrupt or unreadable"),
    ("truncated.png", _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))[:300],
     "corrupt or unreadable"),
    ("zero-size.jpg", _jpeg_header_only(0, 16), "corrupt or unreadable|empty size"),
]


@pytest.mark.parametrize(("name", "data", "message"), BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_malformed_images_are_sample_errors(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(SampleError, match=message):
            load_image(source)


def test_the_bomb_is_refused_from_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _png_bomb(20_000)
    assert len(data) < 200_000
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    with pytest.raises(SampleError, match="not decoded"):
        load_image(data)
    assert decoded == []  # refused before any pixel was decoded
    load_image(_png_bytes(Image.new("RGB", (4, 4))))  # the patch does see a decode
    assert decoded == [(4, 4)]


def test_the_pixel_limit_is_adjustable() -> None:
    img = _png_bytes(Image.new("RGB", (100, 50)))
    try:
        images.set_max_pixels(4_999)
        with pytest.raises(SampleError, match="100x50 = 0 MP, over the 0.004999 MP limit"):
            load_image(img)
        images.set_max_pixels(5_000)
        assert load_image(img).size == (100, 50)
        with pytest.raises(VopdError, match="positive"):
            images.set_max_pixels(0)
    finally:
        images.set_max_pixels(images.DEFAULT_MAX_PIXELS)


def test_large_jpegs_decode_at_reduced_size_when_a_small_view_is_enough() -> None:
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), np.uint8)).resize((1600, 1200))
    buf = io.BytesIO()
    big.save(buf, "JPEG")
    data = buf.getvalue()
    full = load_image(data)
    assert full.size == (1600, 1200) and "original_size" not in full.info
    small = load_image(data, need_pixels=200_000)  # 1/4 would be 400x300 = 120k < 200k: 1/2 it is
    assert small.size == (800, 600) and small.info["original_size"] == (1600, 1200)
    assert load_image(data, need_pixels=100_000).size == (400, 300)
    png = _png_bytes(Image.new("RGB", (1600, 1200)))
    assert load_image(png, need_pixels=100_000).size == (1600, 1200)  # only JPEG has a reduced decode


def test_16_bit_greys_stay_visible() -> None:
    grey16 = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))
    assert load_image(_png_bytes(grey16)).getpixel((0, 0)) == (128, 128, 128)  # not clipped to white


def test_a_run_over_bad_images_scores_the_good_rows(tmp_path: Path) -> None:
    """End to end: the bomb, a truncated file, a directory and a missing file are sample errors; the good row is
    scored; nothing stops the run."""
    Image.new("RGB", (32, 24), (0, 200, 0)).save(tmp_path / "a.png")
    (tmp_path / "bomb.png").write_bytes(_png_bomb(20_000))
    (tmp_path / "cut.png").write_bytes((tmp_path / "a.png").read_bytes()[:40])
    (tmp_path / "folder.png").mkdir()
    rows = [ROW, {**ROW, "id": "bomb", "image": "bomb.png"}, {**ROW, "id": "cut", "image": "cut.png"},
            {**ROW, "id": "dir", "image": "folder.png"}, {**ROW, "id": "gone", "image": "gone.png"}]
    data = tmp_path / "d.jsonl"
    data.write_text(_jsonl(*rows), encoding="utf-8")

    cfg = GapReportConfig(model="says-b", benchmarks=[f"local:{data}"], views=("full",), out=str(tmp_path / "out"),
                          quiet=True)
    recs = {r.sample_id: r for r in run_gap_report(cfg, backend=SaysBackend("B")).records}
    assert recs["r1"].error is None and recs["r1"].correct
    assert "over the 100 MP limit" in recs["bomb"].error
    assert "corrupt or unreadable" in recs["cut"].error
    assert "image file not found" in recs["dir"].error and "image file not found" in recs["gone"].error
    assert all(recs[k].error_kind == "sample" for k in ("bomb", "cut", "dir", "gone"))
