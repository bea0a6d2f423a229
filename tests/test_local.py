"""`local:PATH` (JSONL, CSV, Parquet) and image loading, including every kind of bad input: a bad row becomes a
BadSample with its reason while the good rows around it still load; a bad file or name is one VopdError line."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vopd_bench import benchmarks
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.images import image_ref, load_image
from vopd_bench.samples import BadSample, Sample


def _png(path: Path, size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (0, 128, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _noise_png_bytes(size: tuple[int, int] = (32, 32)) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _by_id(samples: list[Sample | BadSample]) -> dict[str, Sample | BadSample]:
    return {s.id: s for s in samples}


GOOD = {"id": "good", "image": "img/a.png", "question": "What colour is the car?", "options": ["red", "blue"],
        "answer": "B", "bbox": [1, 2, 30, 40], "category": "colour"}


# --------------------------------------------------------------------------------------------------------------
# good files in each format


def test_jsonl_paths_boxes_and_formats(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    absolute = _png(tmp_path / "elsewhere" / "b.png")
    path = _write_jsonl(tmp_path / "data.jsonl", [
        GOOD,
        {"id": "abs", "image": str(absolute), "question": "Is there a car?", "answer": "yes", "answer_type": "yesno",
         "bbox": [[0, 0, 10, 10], [20, 20, 30, 40]]},
        {"id": "xywh", "image": "img/a.png", "question": "Q?", "options": ["x", "y", "z"], "answer": "(c)",
         "bbox": [10, 20, 5, 6], "bbox_format": "xywh"},
        {"id": 7, "image": "img/a.png", "question": "  How many?  ", "answer": 3, "answer_type": "number"},
        "",  # blank lines are skipped
    ])
    loaded = benchmarks.load(f"local:{path}")
    assert loaded.name == "local:data" and loaded.spec.source == str(path)
    s = _by_id(loaded.samples)
    assert set(s) == {"good", "abs", "xywh", "7"}
    good = s["good"]
    assert isinstance(good, Sample)
    assert good.image == str(tmp_path / "img" / "a.png")  # relative to the file, not the working directory
    assert good.options == ("red", "blue") and good.answer == "B" and good.answer_type == "mcq"
    assert good.boxes == ((1.0, 2.0, 30.0, 40.0),) and good.category == "colour"
    assert s["abs"].image == str(absolute)
    assert s["abs"].boxes == ((0.0, 0.0, 10.0, 10.0), (20.0, 20.0, 30.0, 40.0))
    assert s["abs"].answer_type == "yesno" and s["abs"].category is None
    assert s["xywh"].boxes == ((10.0, 20.0, 15.0, 26.0),) and s["xywh"].answer == "C"
    assert s["7"].question == "How many?" and s["7"].answer == "3" and s["7"].boxes == ()
    assert not s["7"].has_evidence
    assert load_image(s["good"].image).size == (64, 48)


def test_relative_file_path_resolves_images_next_to_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "data" / "img" / "a.png")
    _write_jsonl(tmp_path / "data" / "q.jsonl", [GOOD])
    monkeypatch.chdir(tmp_path)
    (sample,) = benchmarks.load("local:data/q.jsonl").samples
    assert isinstance(sample, Sample)
    assert Path(sample.image).resolve() == (tmp_path / "data" / "img" / "a.png").resolve()
    assert load_image(sample.image).size == (64, 48)


def test_csv_with_lists_as_json_text(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    pd.DataFrame([
        {"id": "c1", "image": "img/a.png", "question": "Q1?", "options": '["red", "blue", "green"]', "answer": "C",
         "bbox": "[[1, 2, 30, 40], [5, 5, 60, 20]]", "bbox_format": "", "category": ""},
        {"id": "c2", "image": str(tmp_path / "img" / "a.png"), "question": "Q2?", "options": "", "answer": "stop",
         "bbox": "[1, 2, 30, 40]", "bbox_format": "xywh", "category": "ocr"},
        {"id": "c3", "image": "img/a.png", "question": "Q3?", "options": "", "answer": "no", "bbox": "",
         "bbox_format": "", "category": ""},
    ]).to_csv(tmp_path / "data.csv", index=False)
    s = _by_id(benchmarks.load(f"local:{tmp_path / 'data.csv'}").samples)
    assert all(isinstance(v, Sample) for v in s.values()), s
    assert s["c1"].options == ("red", "blue", "green") and s["c1"].answer == "C"
    assert s["c1"].boxes == ((1.0, 2.0, 30.0, 40.0), (5.0, 5.0, 60.0, 20.0))
    assert s["c1"].category is None and s["c1"].image == str(tmp_path / "img" / "a.png")
    assert s["c2"].options == () and s["c2"].answer_type == "short" and s["c2"].category == "ocr"
    assert s["c2"].boxes == ((1.0, 2.0, 31.0, 42.0),)  # xywh
    assert s["c3"].boxes == ()


def test_parquet_list_columns(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    pd.DataFrame([
        {"id": "p1", "image": "img/a.png", "question": "Q?", "options": ["red", "blue"], "answer": "A",
         "bbox": [[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 20.0, 20.0]]},
        {"id": "p2", "image": "img/a.png", "question": "Q?", "options": ["red", "blue"], "answer": "B",
         "bbox": [[3.0, 4.0, 5.0, 6.0]]},
    ]).to_parquet(tmp_path / "data.parquet")
    s = _by_id(benchmarks.load(f"local:{tmp_path / 'data.parquet'}").samples)
    assert s["p1"].boxes == ((1.0, 2.0, 30.0, 40.0), (5.0, 5.0, 20.0, 20.0))
    assert s["p2"].boxes == ((3.0, 4.0, 5.0, 6.0),)
    assert s["p1"].options == ("red", "blue") and s["p2"].answer == "B"
    assert s["p1"].image == str(tmp_path / "img" / "a.png")


def test_parquet_single_box_column(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    pd.DataFrame([{"id": "p", "image": "a.png", "question": "Q?", "answer": "x", "bbox": [1.0, 2.0, 3.0, 4.0]}]) \
        .to_parquet(tmp_path / "one.parquet")
    (s,) = benchmarks.load(f"local:{tmp_path / 'one.parquet'}").samples
    assert isinstance(s, Sample) and s.boxes == ((1.0, 2.0, 3.0, 4.0),)


def test_limit_and_duplicate_ids(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    rows = [{**GOOD, "id": "same"}, {**GOOD, "id": "same"}, {**GOOD, "id": "other"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    ids = [s.id for s in benchmarks.load(f"local:{path}").samples]
    assert ids == ["same", "same#1", "other"]  # kept apart, visibly, never merged
    assert [s.id for s in benchmarks.load(f"local:{path}", limit=2).samples] == ["same", "same#1"]


# --------------------------------------------------------------------------------------------------------------
# bad rows: each becomes a BadSample with its reason, the good rows still load

BAD_ROWS: list[tuple[str, dict | str, str]] = [
    ("no_question", {"id": "no_question", "image": "img/a.png", "answer": "B"}, "missing field 'question'"),
    ("no_image", {"id": "no_image", "question": "Q?", "answer": "B"}, "missing field 'image'"),
    ("blank_image", {"id": "blank_image", "image": " ", "question": "Q?", "answer": "B"}, "missing field 'image'"),
    ("line5", '{"id": "broken", "image": "img/a.png", "question": ', "line 5 is not a valid JSON object"),
    ("line6", "[1, 2, 3]", "line 6 is not a valid JSON object"),
    ("zero", {**GOOD, "id": "zero", "bbox": [10, 10, 10, 20]}, "zero area"),
    ("inverted", {**GOOD, "id": "inverted", "bbox": [30, 10, 10, 20]}, "inverted"),
    ("nan", {**GOOD, "id": "nan", "bbox": [1, 2, float("nan"), 4]}, "NaN"),
    ("short_box", {**GOOD, "id": "short_box", "bbox": [1, 2, 3]}, "must have 4 numbers"),
    ("text_box", {**GOOD, "id": "text_box", "bbox": [1, 2, "three", 4]}, "non-numeric"),
    ("xywh_zero", {**GOOD, "id": "xywh_zero", "bbox": [1, 2, 0, 4], "bbox_format": "xywh"}, "zero area"),
    ("bad_format", {**GOOD, "id": "bad_format", "bbox_format": "cxcywh"}, "unknown box format"),
    ("letter", {**GOOD, "id": "letter", "answer": "C"}, "not one of the option letters A-B"),
    ("word", {**GOOD, "id": "word", "answer": "blue"}, "not one of the option letters"),
    ("opts", {**GOOD, "id": "opts", "options": "red or blue"}, "options must be a list"),
    ("atype", {**GOOD, "id": "atype", "answer_type": "essay"}, "answer_type 'essay'"),
]


def test_bad_rows_become_bad_samples_with_reasons(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    rows = [GOOD] + [r for _, r, _ in BAD_ROWS] + [{**GOOD, "id": "good_after"}]
    # the raw lines: GOOD is line 1, so BAD_ROWS[i] is on line i + 2
    assert BAD_ROWS[3][0] == "line5" and BAD_ROWS[4][0] == "line6"
    loaded = benchmarks.load(f"local:{_write_jsonl(tmp_path / 'mixed.jsonl', rows)}")
    s = _by_id(loaded.samples)
    assert len(loaded.samples) == len(rows)  # nothing dropped
    assert isinstance(s["good"], Sample) and isinstance(s["good_after"], Sample)
    for sample_id, _, reason in BAD_ROWS:
        bad = s[sample_id]
        assert isinstance(bad, BadSample), sample_id
        assert reason in bad.error, (sample_id, bad.error)
        assert "\n" not in bad.error  # one line
    assert s["zero"].category == "colour"  # kept for per-category counts


def test_bad_csv_cell_is_one_bad_row(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    pd.DataFrame([
        {"id": "ok", "image": "a.png", "question": "Q?", "options": '["a", "b"]', "answer": "A"},
        {"id": "cut", "image": "a.png", "question": "Q?", "options": '["a", "b"', "answer": "A"},
    ]).to_csv(tmp_path / "d.csv", index=False)
    s = _by_id(benchmarks.load(f"local:{tmp_path / 'd.csv'}").samples)
    assert isinstance(s["ok"], Sample)
    assert isinstance(s["cut"], BadSample) and "cannot parse" in s["cut"].error


def test_non_utf8_line_is_one_bad_row(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    path = tmp_path / "d.jsonl"
    good = json.dumps({**GOOD, "id": "ok"}).encode()
    path.write_bytes(b'{"id": "x", "question": "caf\xe9"}\n' + good + b"\n")
    s = _by_id(benchmarks.load(f"local:{path}").samples)
    assert isinstance(s["line1"], BadSample) and "utf-8" in s["line1"].error
    assert isinstance(s["ok"], Sample)


def test_missing_and_corrupt_images_fail_at_load_image(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (tmp_path / "img" / "text.jpg").write_text("hello", encoding="utf-8")
    truncated = _noise_png_bytes((64, 64))
    (tmp_path / "img" / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    path = _write_jsonl(tmp_path / "d.jsonl", [
        GOOD,
        {**GOOD, "id": "missing", "image": "img/nope.png"},
        {**GOOD, "id": "corrupt", "image": "img/corrupt.png"},
        {**GOOD, "id": "text", "image": "img/text.jpg"},
        {**GOOD, "id": "truncated", "image": "img/truncated.png"},
    ])
    s = _by_id(benchmarks.load(f"local:{path}").samples)
    assert all(isinstance(v, Sample) for v in s.values())  # images are read when rendered, not when listed
    assert load_image(s["good"].image).mode == "RGB"
    with pytest.raises(SampleError, match="image file not found: .*nope.png"):
        load_image(s["missing"].image)
    for bad in ("corrupt", "text", "truncated"):
        with pytest.raises(SampleError, match="corrupt or unreadable image"):
            load_image(s[bad].image)


# --------------------------------------------------------------------------------------------------------------
# run-level errors: one VopdError line


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("local:{tmp}/nope.jsonl", "file not found"),
        ("local:{tmp}/nope.parquet", "file not found"),
        ("local:{tmp}/a.png", "unsupported file type '.png'"),
        ("local:", "needs a path"),
        ("no-such-benchmark", "unknown benchmark 'no-such-benchmark'"),
    ],
)
def test_run_level_errors(tmp_path: Path, name: str, message: str) -> None:
    _png(tmp_path / "a.png")
    with pytest.raises(VopdError, match=message) as info:
        benchmarks.load(name.format(tmp=tmp_path))
    assert not isinstance(info.value, SampleError)
    assert "\n" not in str(info.value)


def test_unknown_benchmark_lists_the_available_ones() -> None:
    with pytest.raises(VopdError, match="available: .*local.*synthetic"):
        benchmarks.load("vstar-typo")


def test_unreadable_csv_and_parquet_are_run_level(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "bad.csv").write_text('id,image\n1,"unterminated\n', encoding="utf-8")
    for name in ("bad.parquet", "bad.csv"):
        with pytest.raises(VopdError, match="cannot read as") as info:
            benchmarks.load(f"local:{tmp_path / name}")
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------------------
# image sources


def test_load_image_from_every_source(tmp_path: Path) -> None:
    data = _noise_png_bytes()
    path = tmp_path / "n.png"
    path.write_bytes(data)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    b64 = base64.b64encode(data).decode()
    sources = [str(path), path, data, b64, f"data:image/png;base64,{b64}", {"bytes": data, "path": None},
               {"bytes": None, "path": str(path)}, Image.open(path), lambda: Image.open(path)]
    for src in sources:
        img = load_image(src)
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), reference), type(src)


def test_load_image_converts_modes() -> None:
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 128))
    assert load_image(rgba).mode == "RGB" and load_image(rgba).getpixel((0, 0)) == (10, 20, 30)
    assert load_image(Image.new("L", (4, 3), 200)).getpixel((1, 1)) == (200, 200, 200)
    rgb = Image.new("RGB", (4, 3))
    assert load_image(rgb) is rgb  # already RGB: no copy


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"not an image", "corrupt or unreadable"),
        (b"", "corrupt or unreadable"),
        ({"bytes": None, "path": None}, "neither bytes nor path"),
        ({"path": "/definitely/not/here.png"}, "image file not found"),
        ("missing/relative.png", "image file not found"),
        ("A" * 2000 + "!!!", "corrupt or unreadable|neither a file path nor valid base64"),
        (12345, "unsupported image source of type int"),
    ],
)
def test_load_image_errors_are_sample_errors(source: object, message: str) -> None:
    with pytest.raises(SampleError, match=message):
        load_image(source)  # type: ignore[arg-type]


def test_image_ref(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png")
    assert image_ref(str(path)) == str(path.resolve())
    assert image_ref(path) == str(path.resolve())
    assert image_ref({"path": "x/y.png", "bytes": None}) == "x/y.png"
    assert image_ref(b"bytes") is None and image_ref(Image.new("RGB", (1, 1))) is None


def test_unlabelled_rows_load_without_an_answer(tmp_path: Path) -> None:
    """The trainer needs no labels, so a row without `answer` is a valid sample; gap-report cannot score it and
    records that per sample (see tests/test_runner.py)."""
    _png(tmp_path / "img" / "a.png")
    path = _write_jsonl(tmp_path / "u.jsonl", [{"id": "u", "image": "img/a.png", "question": "Q?",
                                                "options": ["red", "blue"], "bbox": [1, 2, 30, 40]}])
    (s,) = benchmarks.load(f"local:{path}").samples
    assert isinstance(s, Sample) and s.answer is None and s.options == ("red", "blue")
