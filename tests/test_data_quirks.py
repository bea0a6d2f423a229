"""Real-data quirks of the hub benchmarks, each on a fixture in the real schema: MME-RealWorld-CN's full-width
option brackets, CV-Bench's shipped prompt (question optional), ZoomBench's unknown question types, POPE's two
yes-ratios and the original POPE reading of answers, and V* questions without a box keeping their full view."""

from __future__ import annotations

import hub_fixtures as fx
import pyarrow.parquet as pq
import pytest
from report_fixtures import SaysBackend

from vopd_bench.analysis import records_frame
from vopd_bench.benchmarks import load
from vopd_bench.benchmarks.hub.pope import original_pope_answer, original_pope_scorer
from vopd_bench.benchmarks.hub.zoombench import _adapt as zoombench_adapt
from vopd_bench.benchmarks.metrics import pope_metrics
from vopd_bench.errors import VopdError
from vopd_bench.records import Record
from vopd_bench.runner import GapReportConfig, run_gap_report
from vopd_bench.samples import Sample


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import datasets

    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("quirks")
    for write in (fx.write_vstar, fx.write_mme_realworld, fx.write_cvbench, fx.write_pope):
        write(root)
    fx.write_cvbench(root, drop="question")
    fx.write_cvbench(root, drop="prompt")
    return root


def _samples(name: str, data_dir) -> dict[str, Sample]:
    return {s.id: s for s in load(name, data_dir=str(data_dir)).samples}


def test_mme_realworld_cn_full_width_brackets(data):
    c = _samples("mme-realworld-cn", data)
    row = c["1"]
    assert isinstance(row, Sample)  # not a bad sample
    assert row.options == ("红色", "蓝色", "绿色", "白色", "图像中没有显示路牌。") and row.answer == "B"


def test_cvbench_sends_the_shipped_prompt_and_question_is_optional(data):
    shipped = pq.read_table(data / "CV-Bench/test_3d.parquet", columns=["prompt"]).column(0).to_pylist()[0]
    for copy in ("CV-Bench", "CV-Bench-no-question", "CV-Bench-no-prompt"):
        lb = load("cv-bench", data_dir=str(data / copy))
        s = {x.id: x for x in lb.samples}
        assert all(isinstance(x, Sample) for x in s.values()), copy
        # The shipped prompt as written; without it, the same text rebuilt from question and choices.
        assert lb.spec.render_prompt(s["3D-0"].question, s["3D-0"].options) == shipped, copy
        assert s["3D-0"].options == ("sink", "towel") and s["2D-0"].answer == "B"
    lmms = load("cv-bench@lmms", data_dir=str(data / "CV-Bench-no-question"))
    s = {x.id: x for x in lmms.samples}
    assert lmms.spec.render_prompt(s["3D-0"].question, s["3D-0"].options) == (
        "Note: You only need to respond with A, B without providing any additional information.\n\n" + shipped)


def test_cvbench_without_prompt_or_question_is_refused(tmp_path):
    fx.write_cvbench(tmp_path, drop="prompt")
    import pyarrow.parquet as pq_

    for f in ("test_2d.parquet", "test_3d.parquet"):
        path = tmp_path / "CV-Bench-no-prompt" / f
        t = pq_.read_table(path)
        pq_.write_table(t.drop(["question"]), path)
    with pytest.raises(VopdError, match="none of the column"):
        load("cv-bench", data_dir=str(tmp_path / "CV-Bench-no-prompt"))


MCQ_QUERY = "How many windows? Select from the following choices.\n(A) 3\n(B) 4"


@pytest.mark.parametrize(("qtype", "query", "answer", "want_type", "want_options"), [
    ("mcq", MCQ_QUERY, "B", "mcq", ("3", "4")),
    ("multiple choice", MCQ_QUERY, "B", "mcq", ("3", "4")),  # a space: once sent to open-answer scoring
    ("Multiple-Choice", MCQ_QUERY, "(B)", "mcq", ("3", "4")),
    ("lettered?", MCQ_QUERY, "B", "mcq", ("3", "4")),  # unknown: the options and the letter answer decide
    ("lettered?", "How many birds sit on the wire?", "7", "number", ()),
    ("lettered?", MCQ_QUERY, "four", "short", ()),  # options, but the answer is no letter: open
    (None, MCQ_QUERY, "A", "mcq", ("3", "4")),
    ("oq", "What is written on the sign?", "EXIT", "short", ()),
    ("open-ended", "How many birds?", "7", "number", ()),
])
def test_zoombench_question_types(qtype, query, answer, want_type, want_options):
    row = zoombench_adapt({"id": "z", "query": query, "response": answer, "question_type": qtype})
    assert (row["answer_type"], tuple(row["options"])) == (want_type, want_options)


def _pope_record(sid: str, gt: str, parsed: str | None, category: str = "random") -> Record:
    return Record(key=sid, benchmark="pope", sample_id=sid, view="full", category=category, answer=gt,
                  answer_type="yesno", parsed=parsed, correct=parsed == gt, parse_failed=parsed is None,
                  meta={"category": category})


def test_pope_reports_both_yes_ratios_under_distinct_names():
    # ground truth: 3 yes, 1 no; predictions: yes, no, unparsed, yes
    records = [_pope_record("a", "yes", "yes"), _pope_record("b", "yes", "no"), _pope_record("c", "yes", None),
               _pope_record("d", "no", "yes")]
    rows = {(r["category"], r["metric"]): r for r in pope_metrics(records_frame(records))}
    assert rows[("all", "yes_ratio_pred_full")]["value"] == 2 / 4
    assert rows[("all", "yes_ratio_gt_full")]["value"] == 3 / 4
    assert ("all", "yes_ratio_full") not in rows  # the ambiguous name is gone


@pytest.mark.parametrize(("response", "reading"), [
    ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("There is not a dog.", "no"),
    ("Yes, there is. No doubt.", "yes"),  # only the first sentence counts
    ("No, there is none", "no"),  # the comma is removed before splitting
    ("NO", "yes"), ("I cannot tell", "yes"), ("", "yes"),  # the original reads anything else as yes
])
def test_original_pope_reading(response, reading):
    assert original_pope_answer(response) == reading


def test_pope_original_variant_scores_unparsed_answers_as_yes(data, tmp_path):
    for name, want in (("pope", [False, False, False]), ("pope@original", [True, True, False])):
        cfg = GapReportConfig(model="scripted", benchmarks=[name], out=str(tmp_path / name), quiet=True,
                              data_dir=str(data))
        result = run_gap_report(cfg, backend=SaysBackend("I cannot tell."))
        recs = sorted(result.records, key=lambda r: r.sample_id)
        assert [r.correct for r in recs] == want, name  # answers: yes, yes, no
        assert all(r.parse_failed for r in recs) == (name == "pope")
    sample = Sample(id="x", image=b"", question="Is there a dog?", answer="no", answer_type="yesno")
    assert original_pope_scorer(sample, "No, there is not.") == ("no", True)


def test_vstar_question_without_a_box_gets_its_full_view_scored(data, tmp_path):
    cfg = GapReportConfig(model="always-a", benchmarks=["vstar"], out=str(tmp_path), quiet=True, data_dir=str(data))
    result = run_gap_report(cfg, backend=SaysBackend("A"))
    views = {}
    for r in result.records:
        views.setdefault(r.sample_id, {})[r.view] = r
    assert set(views["0"]) == {"full", "crop", "box"}
    for no_box in ("2", "3"):  # an empty box list; no annotation file
        assert set(views[no_box]) == {"full"}
        rec = views[no_box]["full"]
        assert rec.error is None and rec.correct == (rec.answer == "A")
    s = result.summary
    n_no_ev = s[(s.benchmark == "vstar") & (s.category == "all") & (s.metric == "n_no_evidence")]["value"].item()
    acc = s[(s.benchmark == "vstar") & (s.category == "all") & (s.metric == "acc_full")]
    assert n_no_ev == 2
    assert acc["n"].item() == 4 and acc["value"].item() == pytest.approx(2 / 4)  # answers A, B, A, C; said A
