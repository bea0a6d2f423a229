"""Training prompts from the three sources, the data order, and the config resolution."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vopd_bench import views
from vopd_bench.benchmarks import load
from vopd_bench.errors import VopdError
from vopd_train.config import TOY_PRESET, DistillConfig, load_yaml, resolve
from vopd_train.data import batch_indices, load_prompts


def test_benchmark_split_prompts_match_gap_report():
    ps = load_prompts("synthetic:train", limit=3)
    assert ps.kind == "benchmark" and ps.benchmarks == ["synthetic:train"] and len(ps.prompts) == 3
    lb = load("synthetic:train", limit=3)
    s = lb.samples[0]
    r = ps.prompts[0].render()
    # the student text is exactly what gap-report sends for the full view; the teacher has the same text
    assert r.text == lb.spec.render_prompt(s.question, s.options)
    full = s.image()
    assert r.student_image.tobytes() == full.tobytes()
    crop, _ = views.crop_view(full, s.boxes)
    assert r.teacher_image.size == crop.size and r.teacher_image.tobytes() == crop.tobytes()
    # the box view: red outline + the paper's hint, the teacher still the crop with that same text
    rb = load_prompts("synthetic:train", limit=1, student_view="box").prompts[0].render()
    assert rb.text == lb.spec.render_prompt(views.with_hint(s.question), s.options)
    assert rb.student_image.tobytes() == views.box_view(full, s.boxes).tobytes()
    assert rb.teacher_image.tobytes() == crop.tobytes()


def test_failures_jsonl_regenerates_in_memory_images_and_reads_paths(tmp_path):
    test = load("synthetic", limit=4)
    s0, s1 = test.samples[0], test.samples[1]
    img_path = tmp_path / "one.png"
    s1.image().save(img_path)
    rows = [
        {"benchmark": "synthetic", "sample_id": s0.id, "image": None, "boxes": [list(b) for b in s0.boxes],
         "question": s0.question, "options": list(s0.options), "prompt": test.spec.render_prompt(s0.question, s0.options),
         "answer": s0.answer, "meta": {"seed": 0}},
        {"benchmark": "synthetic", "sample_id": s1.id, "image": str(img_path), "boxes": [list(b) for b in s1.boxes],
         "question": s1.question, "options": list(s1.options)},
        {"benchmark": "synthetic", "sample_id": "test-99999", "image": None, "boxes": [[1, 1, 5, 5]],
         "question": "q", "options": []},
        {"benchmark": "synthetic", "sample_id": "nobox", "image": str(img_path), "boxes": [], "question": "q"},
    ]
    path = tmp_path / "failures.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    ps = load_prompts(str(path))
    assert ps.kind == "failures" and ps.benchmarks == ["synthetic"]
    assert [p.id for p in ps.prompts] == [f"synthetic/{s0.id}", f"synthetic/{s1.id}"]
    reasons = {s["id"]: s["reason"] for s in ps.skipped}
    assert "not found" in reasons["synthetic/test-99999"]
    assert "no evidence box" in reasons["synthetic/nobox"]
    assert any("not valid JSON" in r for r in reasons.values())
    r0, r1 = ps.prompts[0].render(), ps.prompts[1].render()
    assert r0.student_image.tobytes() == s0.image().tobytes()  # rebuilt from the benchmark
    assert r0.text == rows[0]["prompt"]
    assert r1.student_image.tobytes() == s1.image().tobytes()  # read from the path
    assert r1.teacher_image.tobytes() == views.crop_view(s1.image(), s1.boxes)[0].tobytes()


def test_failures_of_a_procedural_benchmark_rebuild_only_their_samples(tmp_path, monkeypatch):
    """Records of synthetic:train (25,200 samples) are rebuilt one by one, not by loading the split."""
    from vopd_bench import benchmarks
    from vopd_bench.benchmarks.synthetic import make_sample

    wanted = [make_sample(i, "train") for i in (7, 20001)]
    path = tmp_path / "failures.jsonl"
    path.write_text("".join(json.dumps({"benchmark": "synthetic:train", "sample_id": s.id, "image": None}) + "\n"
                            for s in wanted))

    def no_load(*a, **kw):
        raise AssertionError("the whole benchmark was loaded")

    monkeypatch.setattr(benchmarks, "load", no_load)
    ps = load_prompts(str(path))
    assert [p.id for p in ps.prompts] == [f"synthetic:train/{s.id}" for s in wanted] and not ps.skipped
    assert ps.prompts[1].render().student_image.tobytes() == wanted[1].image().tobytes()


def test_failures_file_of_the_wrong_kind_is_one_clear_error(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"foo": 1}\n')
    with pytest.raises(VopdError, match="not a gap-report failures.jsonl"):
        load_prompts(str(p))


def test_vopd6k_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "teacher_images").mkdir()
    Image.new("RGB", (64, 48), (200, 0, 0)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (32, 32), (0, 200, 0)).save(tmp_path / "teacher_images" / "a.png")
    rows = [
        {"images": ["images/a.png"], "teacher_images": ["teacher_images/a.png"],
         "problem": "<image>\nWhat colour is the car?\nA. red\nB. blue", "answer": "A"},
        {"images": ["images/a.png"], "teacher_images": [], "problem": "<image>q"},
        {"images": ["images/a.png"], "teacher_images": ["teacher_images/missing.png"], "problem": "<image>q"},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ps = load_prompts(str(tmp_path))
    assert ps.kind == "vopd6k" and len(ps.prompts) == 2 and len(ps.skipped) == 1
    r = ps.prompts[0].render()
    assert r.text == "What colour is the car?\nA. red\nB. blue"
    assert r.student_image.size == (64, 48) and r.teacher_image.size == (32, 32)
    from vopd_bench.errors import SampleError

    with pytest.raises(SampleError):  # a missing file surfaces when its batch comes up; the trainer records it
        ps.prompts[1].render()
    with pytest.raises(VopdError, match="train.jsonl"):
        load_prompts(str(tmp_path / "images"))


def test_unknown_source_is_one_clear_error():
    with pytest.raises(VopdError, match="unknown benchmark"):
        load_prompts("nosuchbench:train")


def test_batches_cover_each_epoch_once_in_a_seeded_order():
    n, bs = 10, 4
    steps = [batch_indices(n, bs, s, seed=1) for s in range(5)]  # 20 draws = 2 epochs
    flat = [i for b in steps for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # each epoch has its own permutation
    assert batch_indices(n, bs, 3, seed=1) == steps[3]
    assert batch_indices(n, bs, 0, seed=2) != steps[0]


def test_config_precedence_defaults_preset_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 3e-4\nn-rollouts: 2\nteacher: ema\n")
    cfg, preset = resolve("toy", {"data": "synthetic:train", "out": "o", "teacher": None, "steps": 7}, str(y))
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)  # YAML over the preset
    assert cfg.n_rollouts == 2 and cfg.teacher == "ema"
    assert cfg.steps == 7  # the flag over the preset
    assert cfg.batch_size == TOY_PRESET["batch_size"]  # the preset over the default
    assert "lr" not in preset and "steps" not in preset and preset["batch_size"] == TOY_PRESET["batch_size"]
    cfg2, preset2 = resolve("/some/model", {"data": "d", "out": "o"})
    assert preset2 == {} and cfg2.lr == DistillConfig.lr and cfg2.teacher == "ema"


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(VopdError, match="--teacher"):
        resolve("m", {"data": "d", "out": "o", "teacher": "oracle"})
    with pytest.raises(VopdError, match="--data is required"):
        resolve("m", {"out": "o"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    with pytest.raises(VopdError, match="unknown option"):
        load_yaml(bad)


def test_failures_with_images_inside_a_local_dataset_copy(tmp_path):
    """gap-report on a hub benchmark read from --data-dir hands over records with image None (the image lives in
    the parquet); the trainer finds them in the same local copy, and the teacher gets the benchmark's own crop."""
    import hub_fixtures

    hub_fixtures.write_zoombench(tmp_path)
    lb = load("zoombench", data_dir=str(tmp_path))
    s = next(x for x in lb.samples if x.id == "zb-1")
    failures = tmp_path / "failures.jsonl"
    failures.write_text(json.dumps({"benchmark": "zoombench", "sample_id": "zb-1", "image": None,
                                    "question": s.question, "options": list(s.options)}) + "\n")
    with pytest.raises(VopdError):  # without the local copy there is nothing to read the image from
        load_prompts(str(failures))
    ps = load_prompts(str(failures), data_dir=str(tmp_path))
    r = ps.prompts[0].render()
    assert r.student_image.size == (320, 240) and r.teacher_image.size == (60, 80)
