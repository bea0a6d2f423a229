"""The hub benchmarks, without the hub: each loads a fixture written in its real schema through the same loader
as a hub copy, renders the paper's prompt exactly, and scores with its own metrics (hand-computed values)."""

from __future__ import annotations

import math

import hub_fixtures as fx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from vopd_bench.analysis import records_frame
from vopd_bench.backends.base import Response
from vopd_bench.benchmarks import available, load, resolve
from vopd_bench.benchmarks.hub.common import adapted, parquet_rows, split_option_lines
from vopd_bench.benchmarks.hub.mmstar import split_inline_options
from vopd_bench.benchmarks.hub.mmvp import mmvp_scorer
from vopd_bench.benchmarks.hub.treebench import parse_instances
from vopd_bench.benchmarks.metrics import headline_average, pope_scores, weighted_accuracy
from vopd_bench.benchmarks.spec import ROW_ERROR
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.images import load_image
from vopd_bench.records import Record
from vopd_bench.runner import GapReportConfig, run_gap_report
from vopd_bench.samples import BadSample, Sample

NAMES = ["vstar", "zoombench", "treebench", "hrbench-4k", "hrbench-8k", "mme-realworld", "mme-realworld-cn",
         "mme-realworld-lite", "visualprobe", "mmvp", "cv-bench", "mmstar", "pope"]
VARIANTS = ["vstar@lmms", "hrbench-4k@lmms", "hrbench-8k@lmms", "mme-realworld@lmms", "mme-realworld-cn@lmms",
            "mme-realworld-lite@lmms", "mmvp@lmms", "cv-bench@lmms", "mmstar@lmms", "treebench@vlmeval", "pope@original"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One folder holding a copy of every repository, as `--data-dir` would."""
    import datasets

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("hub")
    for write in (fx.write_vstar, fx.write_zoombench, fx.write_treebench, fx.write_hrbench, fx.write_mme_realworld,
                  fx.write_visualprobe, fx.write_mmvp, fx.write_cvbench, fx.write_mmstar, fx.write_pope):
        write(root)
    fx.write_zoombench(root, schema="card")
    return root


def _by_id(name: str, data_dir) -> tuple:
    lb = load(name, data_dir=str(data_dir))
    return lb, {s.id: s for s in lb.samples}


def _prompt(lb, s: Sample) -> str:
    return lb.spec.render_prompt(s.question, s.options)


def test_every_benchmark_and_variant_is_registered():
    names = set(available())
    assert set(NAMES) | set(VARIANTS) <= names
    for name in NAMES:
        spec, _ = resolve(name)
        assert spec.name == name and spec.source.startswith("hf:")


# ---------------------------------------------------------------------------------------------------------------
# Evidence benchmarks


def test_vstar_boxes_prompts_and_bad_annotations(data):
    lb, s = _by_id("vstar", data)
    assert len(lb.samples) == 4
    glove = s["0"]
    assert glove.boxes == ((564.0, 142.0, 719.0, 299.0),)  # xywh [564, 142, 155, 157] -> xyxy
    assert glove.options == ("rubber", "cotton", "kevlar", "leather") and glove.answer == "A"
    assert glove.category == "direct_attributes" and load_image(glove.image).size == (2000, 1500)
    assert _prompt(lb, glove) == ("What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n"
                                  "(D) leather\nAnswer with the option's letter from the given choices directly.")
    assert s["1"].boxes == ((10.0, 20.0, 40.0, 60.0), (300.0, 200.0, 350.0, 260.0))  # two objects compared
    # An empty box list, or no annotation file: the question keeps its full view (acc_full counts every question).
    for no_box in ("2", "3"):
        assert isinstance(s[no_box], Sample) and s[no_box].boxes == () and not s[no_box].has_evidence
        assert s[no_box].options and s[no_box].answer in ("A", "C")

    lmms, s2 = _by_id("vstar@lmms", data)
    assert _prompt(lmms, s2["0"]) == ("What is the material of the glove?\nA. rubber\nB. cotton\nC. kevlar\n"
                                      "D. leather\nAnswer with the option's letter from the given choices directly.")


@pytest.mark.parametrize("schema", ["released", "card"])
def test_zoombench_both_schemas_crops_and_boxes(data, schema):
    lb, s = _by_id("zoombench", data / ("ZoomBench" if schema == "released" else "ZoomBench-card"))
    mcq, sign, birds = s["zb-1"], s["zb-2"], s["zb-3"]
    assert (mcq.answer_type, mcq.answer, mcq.options) == ("mcq", "B", ("3", "4", "5"))
    assert _prompt(lb, mcq) == ("How many windows does the red house have? Select from the following choices.\n"
                                "(A) 3\n(B) 4\n(C) 5")
    assert (sign.answer_type, sign.answer) == ("short", "OPEN") and _prompt(lb, sign) == "What is written on the small sign?"
    assert (birds.answer_type, birds.answer) == ("number", "7")
    assert load_image(mcq.crop_image).size == (60, 80) and load_image(birds.crop_image).size == (40, 20)
    assert sign.crop_image is None and not sign.has_evidence  # null crop and no bbox: full view only
    assert load_image(mcq.image).size == (320, 240)
    if schema == "released":
        assert mcq.boxes == ((100.0, 50.0, 130.0, 90.0),) and sign.boxes == ()
    else:
        assert mcq.boxes == () and mcq.has_evidence  # the crop alone still gives the crop view


def test_treebench_boxes_literals_and_prompts(data):
    lb, s = _by_id("treebench", data)
    assert s["1"].boxes == ((10.0, 20.0, 50.0, 60.0), (70.0, 20.0, 90.0, 40.0))
    assert s["2"].boxes == () and s["2"].options == ("red", "blue")  # empty target_instances: full view only
    assert isinstance(s["3"], BadSample) and "is not a list literal" in s["3"].error
    assert load_image(s["4"].image).size == (200, 100)  # image "1" stands for row 1's image
    assert _prompt(lb, s["2"]) == ("What colour is the kite?\n(A) red\n(B) blue\n"
                                   "Answer with the option's letter from the given choices directly.")
    vlm, s2 = _by_id("treebench@vlmeval", data)
    assert _prompt(vlm, s2["2"]) == ("Question: What colour is the kite?\nOptions:\nA. red\nB. blue\n"
                                     "Answer with the correct option's letter directly.")


def test_parse_instances_accepts_literals_only():
    assert parse_instances("[[1, 2, 3, 4]]") == [[1, 2, 3, 4]]
    assert parse_instances("") == [] and parse_instances(None) == []
    for bad in ("open('/etc/passwd').read()", "[[1, 2, 3, 4]", "{'a': 1}", "[" * 50_000 + "]" * 50_000):
        with pytest.raises(SampleError):
            parse_instances(bad)


# ---------------------------------------------------------------------------------------------------------------
# Full-view benchmarks: loading and prompts


def test_hrbench_base64_images_and_prompts(data):
    lb, s = _by_id("hrbench-4k", data)
    assert len(s) == 4 and all(not x.has_evidence for x in s.values())
    assert load_image(s["0"].image).size == (400, 225)
    assert s["1"].metadata == {"category": "single", "cycle_category": "cycle2"} and s["1"].answer == "A"
    assert _prompt(lb, s["0"]) == ("What is the colour of the car parked by the tree? Select from the following "
                                   "choices.\n(A) red\n(B) blue\n(C) green\n(D) white")
    lmms, s8 = _by_id("hrbench-8k@lmms", data)
    assert len(s8) == 2 and load_image(s8["1"].image).size == (800, 450)
    assert _prompt(lmms, s8["1"]) == ("Which object is to the left of the bench?\nA. a lamp\nB. a bin\nC. a dog\n"
                                      "D. a bike\nAnswer the option letter directly.")


def test_mme_realworld_three_releases_and_prompts(data):
    en, s = _by_id("mme-realworld", data)
    assert load_image(s["0"].image).size == (300, 200) and s["0"].options[4] == "The image does not feature the number."
    assert _prompt(en, s["0"]) == (
        "What is the number on the bus? The choices are listed below:\n(A) 13\n(B) 14\n(C) 15\n(D) 16\n"
        "(E) The image does not feature the number.\nSelect the best answer to the above multiple-choice question "
        "based on the image. Respond with only the letter (A, B, C, D, or E) of the correct option.\n"
        "The best answer is:")
    en_lmms, s_lmms = _by_id("mme-realworld@lmms", data)
    assert _prompt(en_lmms, s_lmms["0"]) == _prompt(en, s["0"]) + " "
    cn, c = _by_id("mme-realworld-cn", data)
    assert _prompt(cn, c["0"]) == (
        "图中公交车上的数字是多少？选项如下所示:\n(A) 13\n(B) 14\n(C) 15\n(D) 16\n(E) 图像中没有显示该数字。\n"
        "根据图像选择上述多项选择题的最佳答案。只需回答正确选项的字母（A, B, C, D或E）。\n最佳答案为：")
    cn_lmms, c2 = _by_id("mme-realworld-cn@lmms", data)
    assert _prompt(cn_lmms, c2["0"]) == (
        "图中公交车上的数字是多少？ 选项如下所示:\n(A) 13\n(B) 14\n(C) 15\n(D) 16\n(E) 图像中没有显示该数字。\n"
        "根据图像选择上述多项选择题的最佳答案。只需回答正确选项的字母（A, B, C, D 或 E）。\n最佳答案为： ")
    lite, li = _by_id("mme-realworld-lite", data)
    assert list(li) == ["7"] and li["7"].metadata["l2-category"] == "intention/ego"


def test_visualprobe_levels_and_paths(data):
    lb, s = _by_id("visualprobe", data)
    assert [x.category for x in lb.samples] == ["easy", "easy", "medium", "hard"]
    assert _prompt(lb, s["easy-0"]) == "What colour is the umbrella on the balcony?"
    assert (s["easy-1"].answer_type, s["medium-0"].answer_type) == ("number", "short")
    assert load_image(s["hard-0"].image).size == (256, 192)
    one = load("visualprobe:medium", data_dir=str(data / "VisualProbe_Medium"))  # a level's copy itself
    assert one.name == "visualprobe:medium" and [x.id for x in one.samples] == ["medium-0"]
    with pytest.raises(VopdError, match="no copy of Mini-o3/VisualProbe_Easy.*all three levels"):
        load("visualprobe", data_dir=str(data / "VisualProbe_Medium"))


def test_mmvp_prompts_images_and_scorer(data):
    lb, s = _by_id("mmvp", data)
    assert [x.answer for x in lb.samples] == ["A", "B", "B", "A"] and load_image(s["3"].image).size == (224, 224)
    assert _prompt(lb, s["1"]) == "Are the butterfly's wings closer to being open or closed? (a) Open (b) Closed"
    lmms, s2 = _by_id("mmvp@lmms", data)
    assert _prompt(lmms, s2["1"]) == ("Are the butterfly's wings closer to being open or closed?\nA. Open\nB. Closed\n"
                                      "Answer with the option's letter from the given choices directly.")
    first = s["1"]  # answer (a) Open
    for response, parsed in [("(a)", "A"), ("(a) Open", "A"), ("(B) Closed", "B"), ("b", "B"), ("Open", "A"),
                             ("The answer is (b).", "B"), ("(a) or (b)", None), ("I am not sure.", None)]:
        assert mmvp_scorer(first, response) == (parsed, parsed == "A"), response


def test_cvbench_prompts_ids_and_no_boxes(data):
    lb, s = _by_id("cv-bench", data)
    assert sorted(s) == ["2D-0", "2D-1", "3D-0"]
    assert s["3D-0"].boxes == () and not s["3D-0"].has_evidence  # the 3D bbox marks compared objects
    assert s["2D-0"].answer == "B" and s["2D-0"].metadata == {"type": "2D", "source": "COCO", "task": "Count"}
    shipped = pq.read_table(data / "CV-Bench/test_2d.parquet", columns=["prompt"]).column(0).to_pylist()
    assert _prompt(lb, s["2D-0"]) == shipped[0] == ("How many cars are in the image? Select from the following "
                                                    "choices.\n(A) 2\n(B) 3\n(C) 4")
    lmms, s2 = _by_id("cv-bench@lmms", data)
    assert _prompt(lmms, s2["2D-0"]) == ("Note: You only need to respond with A, B, C without providing any "
                                         "additional information.\n\n" + shipped[0])


def test_mmstar_inline_options(data):
    lb, s = _by_id("mmstar", data)
    raw = pq.read_table(data / "MMStar/mmstar.parquet", columns=["question"]).column(0).to_pylist()
    assert s["0"].options == ("The suitcase is on the book.", "The suitcase is beneath the cat.",
                              "The suitcase is beside the book.", "The suitcase is beneath the bed.")
    assert _prompt(lb, s["0"]) == raw[0] == (
        "Which option describe the object relationship in the image correctly?\nOptions: A: The suitcase is on the "
        "book., B: The suitcase is beneath the cat., C: The suitcase is beside the book., D: The suitcase is "
        "beneath the bed.")
    assert s["1"].options == () and _prompt(lb, s["1"]) == raw[1]  # another layout is asked as written
    lmms, s2 = _by_id("mmstar@lmms", data)
    assert _prompt(lmms, s2["0"]) == raw[0] + "\nAnswer with the option's letter from the given choices directly"
    assert split_inline_options("Q?\nOptions: A: x, y, B: z") == ("Q?", ("x, y", "z"))
    assert split_inline_options("Q?\nOptions: B: x, A: y")[1] == ()


def test_pope_ids_answers_and_prompt(data):
    lb, s = _by_id("pope", data)
    assert sorted(s) == ["adversarial-1", "popular-1", "random-2"]  # question ids repeat across categories
    assert s["random-2"].answer == "no" and s["random-2"].answer_type == "yesno"
    assert _prompt(lb, s["popular-1"]) == "Is there a dog in the image?\nAnswer the question using a single word or phrase."


@pytest.mark.parametrize("row_group_size", [2, 5])  # groups [0, 1] [2, 3] [4], or one group of all five
def test_parquet_images_are_streamed_a_row_at_a_time(tmp_path, row_group_size):
    import pyarrow as pa

    colours = [(i * 40, 0, 0) for i in range(5)]
    table = pa.table({"k": list(range(5)),
                      "image": [fx.hf_image((8, 8), c) for c in colours],
                      "crop_image": [fx.hf_image((4, 4), c) if i != 3 else None for i, c in enumerate(colours)]})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=row_group_size)
    rows = list(parquet_rows([tmp_path / "x.parquet"], lazy=("image", "crop_image"), nullable=("crop_image",)))
    assert [r["k"] for r in rows] == [0, 1, 2, 3, 4] and rows[3]["crop_image"] is None
    reader = rows[0]["image"]._file
    streams, batch_rows = [], []
    original = reader.stream

    def counted(column, first_group=0, batch_size=1):
        streams.append((column, first_group))
        for batch in original(column, first_group, batch_size):
            batch_rows.append(batch.num_rows)
            yield batch

    reader.stream = counted
    for r in rows:  # as the runner does: each sample's image, then its crop
        assert load_image(r["image"]).getpixel((0, 0)) == colours[r["k"]]
        if r["crop_image"] is not None:
            assert load_image(r["crop_image"]).size == (4, 4)
    assert streams == [("image", 0), ("crop_image", 0)]  # one forward pass per column
    assert set(batch_rows) == {1}  # one cell held at a time, whatever the row groups
    assert load_image(rows[0]["image"]).getpixel((0, 0)) == colours[0]  # going back restarts the stream
    assert load_image(rows[4]["image"]).getpixel((0, 0)) == colours[4]
    assert streams[-1] == ("image", 0)


def test_unexpected_values_become_bad_rows():
    def adapt(row):
        return {**row, "image": row["images"][0]}

    out = list(adapted([{"id": 1, "images": {"a": 1}}, {"id": 2}], adapt))
    assert [ROW_ERROR in r for r in out] == [True, True] and "KeyError" in out[0][ROW_ERROR]


def test_split_option_lines():
    assert split_option_lines("Q?\n(A) x\n(B) y\nPick one.") == ("Q?", ("x", "y"), "Pick one.")
    assert split_option_lines("Q? (A) x (B) y") == ("Q? (A) x (B) y", (), "")
    assert split_option_lines("Q?\n(A) x\n(C) y") == ("Q?", ("x",), "(C) y")


# ---------------------------------------------------------------------------------------------------------------
# Run-level problems


def test_hub_unreachable_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(VopdError) as e:
        load("vstar")
    msg = str(e.value)
    assert "cannot reach the hub for craigwu/vstar_bench" in msg and "--data-dir" in msg and "\n" not in msg


def test_local_copy_missing_or_of_the_wrong_dataset(data, tmp_path):
    with pytest.raises(VopdError, match="no copy of DreamMr/HR-Bench"):
        load("hrbench-4k", data_dir=str(tmp_path))
    (tmp_path / "MMStar").mkdir()
    fx.write_plain_parquet(tmp_path / "MMStar/mmstar.parquet", [{"id": 1, "text": "not mmstar"}])
    with pytest.raises(VopdError, match="lacks column"):
        load("mmstar", data_dir=str(tmp_path))
    with pytest.raises(VopdError, match="takes no argument"):
        load("pope:random", data_dir=str(data))


# ---------------------------------------------------------------------------------------------------------------
# Metrics on hand-made records


def _rec(bench: str, sid: str, right: bool | None, view: str = "full", parsed: str | None = "A",
         answer: str = "A", **meta) -> Record:
    """right=None: an errored record."""
    if right is None:
        return Record(key=f"{bench}{sid}{view}", benchmark=bench, sample_id=sid, view=view, error="boom",
                      error_kind="backend", meta=meta)
    return Record(key=f"{bench}{sid}{view}", benchmark=bench, sample_id=sid, view=view, parsed=parsed, answer=answer,
                  correct=right, parse_failed=parsed is None, meta=meta, category=meta.get("category"))


def _metrics(name: str, records: list[Record]) -> dict[tuple[str, str], dict]:
    spec, _ = resolve(name)
    frame = records_frame(records).drop(columns=["valid", "right"])
    return {(r["category"], r["metric"]): r for r in spec.metrics(frame)}


def test_hrbench_per_cycle_and_cycle_mean():
    c1, c2 = {"cycle_category": "c1"}, {"cycle_category": "c2"}
    records = [
        _rec("hrbench-4k", "1", True, category="single", **c1), _rec("hrbench-4k", "2", False, category="single", **c1),
        _rec("hrbench-4k", "3", True, category="cross", **c1), _rec("hrbench-4k", "4", True, category="cross", **c1),
        _rec("hrbench-4k", "5", True, category="single", **c2), _rec("hrbench-4k", "6", False, category="cross", **c2),
        _rec("hrbench-4k", "7", False, parsed=None, category="single", **c2),  # parse failure: wrong
        _rec("hrbench-4k", "8", None, category="single", **c2),  # errored: left out
    ]
    m = _metrics("hrbench-4k", records)
    assert m[("cycle:c1", "acc_cycle_full")]["value"] == 0.75 and m[("cycle:c1", "acc_cycle_full")]["n"] == 4
    assert m[("cycle:c2", "acc_cycle_full")]["value"] == pytest.approx(1 / 3)
    assert m[("all", "acc_cycle_mean_full")]["value"] == pytest.approx((0.75 + 1 / 3) / 2)
    assert m[("single", "acc_cycle_mean_full")]["value"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m[("cross", "acc_cycle_mean_full")]["value"] == pytest.approx((1.0 + 0.0) / 2)
    assert m[("all", "acc_cycle_mean_full")]["n"] == 7


def test_mme_realworld_tasks_and_subtasks():
    mon, ad = "Perception/Monitoring", "Reasoning/Autonomous_Driving"
    records = [
        _rec("mme-realworld", "1", True, category=mon, **{"l2-category": "attribute/color"}),
        _rec("mme-realworld", "2", False, category=mon, **{"l2-category": "attribute/orientation"}),
        _rec("mme-realworld", "3", True, category=mon, **{"l2-category": "counting/car"}),
        _rec("mme-realworld", "4", False, category=ad, **{"l2-category": "Intention/Ego"}),
    ]
    m = _metrics("mme-realworld", records)
    assert m[("Perception", "acc_task_full")]["value"] == pytest.approx(2 / 3)
    assert m[("Reasoning", "acc_task_full")]["value"] == 0.0
    assert m[(f"{mon}/attribute/attribute", "acc_l2_full")]["value"] == 0.5  # colour and orientation merged
    assert m[(f"{mon}/attribute/attribute", "acc_l2_full")]["n"] == 2
    assert m[(f"{ad}/intention/ego", "acc_l2_full")]["n"] == 1


def test_visualprobe_mean_over_levels_differs_from_pooled():
    records = [_rec("visualprobe", "e1", True, level="easy"), _rec("visualprobe", "e2", True, level="easy"),
               _rec("visualprobe", "m1", True, level="medium"), _rec("visualprobe", "m2", False, level="medium"),
               _rec("visualprobe", "h1", False, level="hard")]
    row = _metrics("visualprobe", records)[("all", "acc_level_mean_full")]
    assert row["value"] == pytest.approx((1 + 0.5 + 0) / 3) and row["n"] == 5  # pooled would be 3/5
    assert row["ci_low"] <= row["value"] <= row["ci_high"]


def test_mmvp_pair_accuracy():
    records = [_rec("mmvp", "1", True, Index="1"), _rec("mmvp", "2", True, Index="2"),
               _rec("mmvp", "3", True, Index="3"), _rec("mmvp", "4", False, Index="4"),
               _rec("mmvp", "5", True, Index="5"), _rec("mmvp", "6", None, Index="6")]  # pair 3 incomplete
    row = _metrics("mmvp", records)[("all", "acc_pair_full")]
    assert (row["value"], row["n"]) == (0.5, 2)


def test_cvbench_official_and_paper_formulas():
    def r(sid, right, source, kind):
        return _rec("cv-bench", sid, right, source=source, type=kind)

    records = [r("1", True, "ADE20K", "2D"), r("2", True, "COCO", "2D"), r("3", False, "COCO", "2D"),
               r("4", False, "COCO", "2D"), r("5", True, "Omni3D", "3D"), r("6", False, "Omni3D", "3D")]
    m = _metrics("cv-bench", records)
    assert m[("all", "acc_official_full")]["value"] == pytest.approx(0.5 * ((1.0 + 1 / 3) / 2 + 0.5))  # 7/12
    assert m[("all", "acc_2d3d_full")]["value"] == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert m[("COCO", "acc_source_full")]["value"] == pytest.approx(1 / 3)
    assert m[("3D", "acc_type_full")]["n"] == 2
    partial = _metrics("cv-bench", records[:4])  # no Omni3D: neither formula can be computed
    assert ("all", "acc_official_full") not in partial and ("all", "acc_2d3d_full") not in partial


def test_mmstar_mean_over_l2_categories():
    def r(sid, right, core, l2):
        return _rec("mmstar", sid, right, category=core, l2_category=l2)

    records = [r("1", True, "X", "a"), r("2", False, "X", "b"), r("3", False, "X", "b"),
               r("4", True, "Y", "c"), r("5", True, "Y", "c"), r("6", False, "Y", "c")]
    m = _metrics("mmstar", records)
    assert m[("all", "acc_l2_mean_full")]["value"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert m[("X", "acc_l2_mean_full")]["value"] == 0.5 and m[("Y", "acc_l2_mean_full")]["value"] == pytest.approx(2 / 3)


def test_pope_precision_recall_f1_and_prediction_yes_ratio():
    def r(sid, gt, pred, category="adversarial"):
        return _rec("pope", sid, pred is not None and pred == gt, parsed=pred, answer=gt, category=category)

    records = ([r(f"tp{i}", "yes", "yes") for i in range(3)] + [r("fp", "no", "yes"), r("fn", "yes", "no"),
               r("pf", "yes", None)] + [r(f"tn{i}", "no", "no", "random") for i in range(2)])
    m = _metrics("pope", records)
    assert m[("all", "precision_full")]["value"] == 3 / 4 and m[("all", "precision_full")]["n"] == 4
    assert m[("all", "recall_full")]["value"] == 3 / 5  # the unparsed answer is not a "yes"
    assert m[("all", "f1_full")]["value"] == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))
    assert m[("all", "yes_ratio_pred_full")]["value"] == 4 / 8
    assert m[("all", "yes_ratio_gt_full")]["value"] == 5 / 8
    assert m[("random", "yes_ratio_pred_full")]["value"] == 0.0 and math.isnan(m[("random", "precision_full")]["value"])
    f1 = m[("all", "f1_full")]
    assert f1["ci_low"] <= f1["value"] <= f1["ci_high"]


def test_weighted_accuracy_and_pope_scores_are_deterministic():
    groups = {"a": np.array([1, 1, 0, 1]), "b": np.array([0, 1])}
    est = weighted_accuracy(groups, {"a": 3.0, "b": 1.0})
    assert est.value == pytest.approx((3 * 0.75 + 0.5) / 4) and est.n == 6
    assert est == weighted_accuracy(groups, {"a": 3.0, "b": 1.0})
    assert 0 <= est.ci_low <= est.value <= est.ci_high <= 1
    gt = np.array([1, 1, 0, 0], bool)
    assert pope_scores(gt, gt)["f1"].value == 1.0 and pope_scores(gt, ~gt)["f1"].value == 0.0


def test_headline_average():
    accs = {"vstar": 0.9, "zoombench": 0.5, "hrbench-4k@lmms": 0.8, "hrbench-8k": 0.7, "mme-realworld": 0.6,
            "mme-realworld-cn": 0.65, "mme-realworld-lite": 0.4}
    rows = [{"benchmark": b, "category": "all", "metric": "acc_full", "value": v, "ci_low": 0, "ci_high": 1, "n": 10}
            for b, v in accs.items()]
    rows.append({"benchmark": "vstar", "category": "direct_attributes", "metric": "acc_full", "value": 0.1,
                 "ci_low": 0, "ci_high": 1, "n": 5})
    out = {r["benchmark"]: r for r in headline_average(pd.DataFrame(rows))}
    assert out["average"]["value"] == pytest.approx((0.9 + 0.5 + 0.8 + 0.7 + 0.6 + 0.65) / 6)
    assert out["average-v1"]["value"] == pytest.approx((0.9 + 0.5 + 0.8 + 0.7 + 0.4 + 0.65) / 6)
    assert out["average"]["n"] == 60 and out["average"]["metric"] == "acc_full"
    without_cn = pd.DataFrame([r for r in rows if r["benchmark"] != "mme-realworld-cn"])
    assert headline_average(without_cn) == []


# ---------------------------------------------------------------------------------------------------------------
# Through the runner


class ScriptedBackend:
    """Answers by benchmark, from the prompt; remembers each request's image size."""

    name = "scripted"
    preferred_batch_size = 4

    def __init__(self):
        self.sizes: dict[str, tuple[int, int]] = {}

    def fingerprint(self) -> str:
        return "scripted-1"

    def generate(self, requests, gen):
        out = []
        for r in requests:
            self.sizes[r.prompt + str(r.image.size)] = r.image.size
            if "Is there a dog" in r.prompt:
                out.append(Response("Yes"))
            elif "Is there a car" in r.prompt:
                out.append(Response("No, there is not."))
            elif "(a) Open" in r.prompt or "(a) Left" in r.prompt:
                out.append(Response("(a) Open"))
            else:
                out.append(Response("B"))
        return out

    def close(self):
        pass


def test_runner_uses_shipped_crops_and_reports_benchmark_metrics(data, tmp_path):
    backend = ScriptedBackend()
    cfg = GapReportConfig(model="scripted", benchmarks=["zoombench", "pope", "mmvp"], out=str(tmp_path), quiet=True,
                          data_dir=str(data / "ZoomBench"))
    with pytest.raises(VopdError, match="lacks column"):  # POPE's layout, but ZoomBench's columns: refused
        run_gap_report(cfg, backend=backend)
    cfg.data_dir = str(data)  # a folder of copies named like their repositories
    result = run_gap_report(cfg, backend=backend)
    by = {(r.benchmark, r.sample_id, r.view): r for r in result.records}
    assert {v for (b, sid, v) in by if b == "zoombench" and sid == "zb-2"} == {"full"}  # no crop, no box
    assert by[("zoombench", "zb-1", "crop")].correct and (60, 80) in backend.sizes.values()  # the shipped crop
    assert by[("zoombench", "zb-1", "box")].prompt.endswith("(C) 5") and "red bounding box" in by[
        ("zoombench", "zb-1", "box")].prompt
    summary = result.summary
    f1 = summary[(summary.benchmark == "pope") & (summary.category == "all") & (summary.metric == "f1_full")]
    assert f1["value"].item() == 1.0  # two yes right, one no right
    pair = summary[(summary.benchmark == "mmvp") & (summary.metric == "acc_pair_full")]
    assert pair["value"].item() == 0.0 and pair["n"].item() == 2  # always (a): each pair has one wrong
