"""The tidy summary and the failure hand-off, on record sets built by hand."""

from __future__ import annotations

import math
import random
from dataclasses import asdict

import pandas as pd
import pytest

from vopd_bench import analysis, stats
from vopd_bench.errors import VopdError
from vopd_bench.records import Record

BOX = [[10.0, 10.0, 30.0, 30.0]]

# (full, crop, box) correctness of eight samples with evidence; s1–s4 are "color", s5–s8 "shape".
OUTCOMES = {
    "s1": (1, 1, 1),
    "s2": (0, 1, 1),
    "s3": (0, 1, 0),
    "s4": (1, 0, 0),
    "s5": (0, 0, 0),
    "s6": (0, 1, 1),
    "s7": (1, 1, 0),
    "s8": (0, 0, 1),
}


def rec(sid: str, view: str, correct: bool | None, *, bench: str = "b", cat: str | None = None,
        area: float | None = 0.01, error: str | None = None, pf: bool = False, boxes=BOX, clamped: int = 0,
        response: str | None = None) -> Record:
    return Record(
        key=f"{bench}/{sid}/{view}", benchmark=bench, sample_id=sid, view=view, category=cat,
        question=f"What colour is object {sid}?", options=["red", "blue"], answer="A", answer_type="mcq",
        prompt=f"prompt {sid}", response=response if response is not None else ("A" if correct else "B"),
        parsed=None if (pf or error) else ("A" if correct else "B"), correct=None if error else bool(correct),
        parse_failed=pf, error=error, error_kind="backend" if error else None, image=f"/img/{sid}.png",
        boxes=[list(b) for b in boxes], boxes_clamped=clamped, evidence_area=area if boxes else None,
        image_size=[100, 100],
    )


def hand_set() -> list[Record]:
    records = []
    for i, (sid, outcome) in enumerate(OUTCOMES.items()):
        cat = "color" if i < 4 else "shape"
        for view, ok in zip(("full", "crop", "box"), outcome, strict=True):
            records.append(rec(sid, view, bool(ok), cat=cat))
    # s9 has no box: the runner asks it the full view only.
    records.append(rec("s9", "full", True, cat="color", boxes=[]))
    return records


def rows(summary: pd.DataFrame, category: str = "all", bench: str = "b") -> dict[str, pd.Series]:
    sub = summary[(summary["benchmark"] == bench) & (summary["category"] == category)]
    return {r["metric"]: r for _, r in sub.iterrows()}


def test_columns_exact_and_types():
    s = analysis.summarize(hand_set(), n_boot=200)
    assert list(s.columns) == ["benchmark", "category", "metric", "value", "ci_low", "ci_high", "n"]
    assert s["n"].dtype.kind == "i" and s["value"].dtype.kind == "f"
    assert not s.duplicated(["benchmark", "category", "metric"]).any()


def test_accuracies_gaps_and_transitions_by_hand():
    m = rows(analysis.summarize(hand_set(), n_boot=500))
    # full: s1, s4, s7 of the paired eight, plus s9 (full only).
    assert (m["acc_full"]["value"], m["acc_full"]["n"]) == (4 / 9, 9)
    assert (m["acc_crop"]["value"], m["acc_crop"]["n"]) == (5 / 8, 8)
    assert (m["acc_box"]["value"], m["acc_box"]["n"]) == (4 / 8, 8)
    assert (m["acc_full_paired"]["value"], m["acc_full_paired"]["n"]) == (3 / 8, 8)
    assert (m["acc_full"]["ci_low"], m["acc_full"]["ci_high"]) == pytest.approx(stats.wilson_ci(4, 9))

    assert m["gap"]["value"] == pytest.approx(2 / 8)
    assert m["gap_locate"]["value"] == pytest.approx(1 / 8)
    assert m["gap_zoom"]["value"] == pytest.approx(1 / 8)
    assert {m[g]["n"] for g in ("gap", "gap_locate", "gap_zoom")} == {8}

    counts = {t: int(m[t]["value"]) for t in analysis.TRANSITION_METRICS}
    assert counts == {"both_right": 2, "recoverable": 3, "crop_only_failure": 1, "both_wrong": 2}
    assert all(m[t]["n"] == 8 for t in analysis.TRANSITION_METRICS)
    # b = 3, c = 1: p = 2 * (C(4,0) + C(4,1)) / 2^4
    assert m["mcnemar_p"]["value"] == pytest.approx(0.625)

    assert (m["n_samples"]["value"], m["n_no_evidence"]["value"]) == (9, 1)


def test_decomposition_sums_to_gap_and_matches_transitions():
    rng = random.Random(5)
    records = []
    for i in range(120):
        area = rng.choice([0.0004, 0.002, 0.007, 0.015, 0.04, 0.08, 0.3])
        for view in ("full", "crop", "box"):
            records.append(rec(f"x{i}", view, rng.random() < {"full": 0.4, "crop": 0.8, "box": 0.55}[view],
                               cat=rng.choice(["a", "b", None]), area=area))
    s = analysis.summarize(records, n_boot=300)
    for cat in ("all", "a", "b"):
        m = rows(s, cat)
        assert m["gap"]["value"] == m["gap_locate"]["value"] + m["gap_zoom"]["value"]
        n = m["gap"]["n"]
        assert m["gap"]["value"] == pytest.approx((m["recoverable"]["value"] - m["crop_only_failure"]["value"]) / n)
        assert m["gap"]["value"] == pytest.approx(m["acc_crop_paired"]["value"] - m["acc_full_paired"]["value"])


def test_every_interval_contains_its_estimate():
    rng = random.Random(11)
    records = [rec(f"y{i}", v, rng.random() < 0.6, cat=rng.choice(["p", "q"]), area=rng.choice([0.003, 0.03]),
                   pf=rng.random() < 0.1) for i in range(80) for v in ("full", "crop", "box")]
    s = analysis.summarize(records, n_boot=500)
    with_ci = s.dropna(subset=["ci_low", "ci_high"])
    assert len(with_ci) > 20
    assert ((with_ci["ci_low"] <= with_ci["value"] + 1e-12) & (with_ci["value"] <= with_ci["ci_high"] + 1e-12)).all()
    gaps = with_ci[with_ci["metric"].str.startswith("gap")]
    assert (gaps["ci_low"] < gaps["ci_high"]).all()


def test_categories_and_none_category():
    records = hand_set()
    records.append(rec("s10", "full", False, cat=None, boxes=[]))
    s = analysis.summarize(records, n_boot=200)
    assert sorted(s["category"].unique()) == ["all", "color", "shape"]
    color = rows(s, "color")
    # color: s1–s4 paired (full right: s1, s4; crop right: s1–s3) and s9 full-only.
    assert (color["acc_full"]["value"], color["acc_full"]["n"]) == (3 / 5, 5)
    assert color["gap"]["value"] == pytest.approx(1 / 4) and color["gap"]["n"] == 4
    assert rows(s)["n_samples"]["value"] == 10  # s10 (no category) counts in `all` only
    assert rows(s, "shape")["n_samples"]["value"] == 4


def test_errors_excluded_and_counted():
    records = hand_set()
    records[2] = rec("s1", "box", None, cat="color", error="CUDA out of memory")  # s1's box record failed
    m = rows(analysis.summarize(records, n_boot=200))
    assert (m["n_errors_box"]["value"], m["n_errors_box"]["n"]) == (1, 8)
    assert m["n_errors_full"]["value"] == 0 and m["n_sample_errors"]["value"] == 1
    assert m["acc_box"]["n"] == 7 and m["acc_box"]["value"] == pytest.approx(3 / 7)
    # s1 leaves the paired set: the seven left have full 2 (s4, s7), crop 4, box 3.
    assert m["gap"]["n"] == 7
    assert m["gap"]["value"] == pytest.approx(2 / 7)
    assert m["gap_locate"]["value"] == pytest.approx(1 / 7)
    assert m["both_right"]["value"] == 1
    # The crop accuracy still uses s1's valid crop record.
    assert m["acc_crop"]["n"] == 8


def test_parse_failure_is_wrong_and_rated():
    records = [
        rec("p1", "full", True, pf=True),  # a scorer that said "correct" on an unparsed answer is overruled
        rec("p2", "full", False, pf=True),
        rec("p3", "full", True),
        rec("p4", "full", False),
        rec("p5", "full", None, error="timeout"),
    ]
    for r in records:
        r.boxes, r.evidence_area = [], None
    m = rows(analysis.summarize(records, n_boot=100))
    assert (m["acc_full"]["value"], m["acc_full"]["n"]) == (1 / 4, 4)
    assert (m["parse_fail_full"]["value"], m["parse_fail_full"]["n"]) == (2 / 4, 4)
    assert (m["parse_fail_full"]["ci_low"], m["parse_fail_full"]["ci_high"]) == pytest.approx(stats.wilson_ci(2, 4))
    assert "gap" not in m  # only the full view was run
    assert m["n_no_evidence"]["value"] == 5


def test_area_bins():
    assert analysis.area_bin(0.0005) == "0-0.1%"
    assert analysis.area_bin(0.001) == "0.1-0.5%"  # bins are closed on the left
    assert analysis.area_bin(0.003) == "0.1-0.5%"
    assert analysis.area_bin(0.01) == "1-2%"
    assert analysis.area_bin(0.07) == "5-10%"
    assert analysis.area_bin(1.0) == "10-100%"
    assert analysis.area_bin(None) is None

    records = []
    # Three samples in 0-0.1% (two recoverable, one both right), two in 2-5% (crop-only failure, both wrong).
    for sid, area, (f, c) in [("a1", 0.0002, (0, 1)), ("a2", 0.0008, (0, 1)), ("a3", 0.0005, (1, 1)),
                              ("b1", 0.03, (1, 0)), ("b2", 0.04, (0, 0))]:
        records += [rec(sid, "full", bool(f), area=area), rec(sid, "crop", bool(c), area=area)]
    m = rows(analysis.summarize(records, n_boot=300))
    bins = {k: v for k, v in m.items() if k.startswith(analysis.AREA_PREFIX)}
    assert set(bins) == {"gap_area:0-0.1%", "gap_area:2-5%"}  # empty bins are skipped
    assert (bins["gap_area:0-0.1%"]["value"], bins["gap_area:0-0.1%"]["n"]) == (pytest.approx(2 / 3), 3)
    assert (bins["gap_area:2-5%"]["value"], bins["gap_area:2-5%"]["n"]) == (pytest.approx(-1 / 2), 2)


def test_box_view_not_run():
    records = [r for r in hand_set() if r.view != "box"]
    m = rows(analysis.summarize(records, n_boot=200))
    assert m["gap"]["value"] == pytest.approx(2 / 8) and m["gap"]["n"] == 8
    assert "gap_locate" not in m and "gap_zoom" not in m and "acc_box" not in m


def test_box_view_that_always_failed_does_not_empty_the_gap():
    # A benchmark that ships crop images but no boxes: every box request is a per-sample error.
    records = [r if r.view != "box" else rec(r.sample_id, "box", None, cat=r.category,
                                             error="the box view needs evidence boxes") for r in hand_set()]
    m = rows(analysis.summarize(records, n_boot=200))
    assert m["gap"]["value"] == pytest.approx(2 / 8) and m["gap"]["n"] == 8
    assert "gap_locate" not in m
    assert m["n_errors_box"]["value"] == 8


def test_boxes_clamped_counted_once_per_sample():
    records = hand_set()
    for r in records:
        if r.sample_id in ("s2", "s5"):
            r.boxes_clamped = 1
    assert rows(analysis.summarize(records, n_boot=100))["boxes_clamped"]["value"] == 2


def test_later_record_replaces_earlier():
    records = hand_set()
    # s5's crop first failed in the backend, then a rerun answered it correctly.
    records.insert(0, rec("s5", "crop", None, cat="shape", error="timeout"))
    records.append(rec("s5", "crop", True, cat="shape"))
    m = rows(analysis.summarize(records, n_boot=100))
    assert m["n_errors_crop"]["value"] == 0
    assert m["acc_crop"]["value"] == pytest.approx(6 / 8)
    assert m["recoverable"]["value"] == 4


def test_dicts_order_and_determinism():
    records = hand_set()
    s1 = analysis.summarize(records, n_boot=300, seed=4)
    shuffled = [asdict(r) for r in random.Random(0).sample(records, len(records))]
    s2 = analysis.summarize(shuffled, n_boot=300, seed=4)
    pd.testing.assert_frame_equal(s1, s2)
    with pytest.raises(VopdError, match="sample_id"):
        analysis.summarize([{"key": "k", "benchmark": "b", "view": "full"}])
    empty = analysis.summarize([])
    assert empty.empty and list(empty.columns) == analysis.SUMMARY_COLUMNS


def test_several_benchmarks_are_separate():
    records = hand_set() + [rec("s1", "full", True, bench="other", boxes=[])]
    s = analysis.summarize(records, n_boot=100)
    assert list(dict.fromkeys(s["benchmark"])) == ["b", "other"]
    other = rows(s, bench="other")
    assert other["acc_full"]["value"] == 1.0 and other["n_samples"]["value"] == 1
    assert rows(s)["n_samples"]["value"] == 9


def test_extra_metrics_appended():
    def pair_metric(df: pd.DataFrame) -> list[dict]:
        full = df[df["view"] == "full"]
        return [{"metric": "full_records", "value": float(len(full)), "n": len(full)},
                {"category": "color", "metric": "custom", "value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 4}]

    s = analysis.summarize(hand_set(), extra_metrics={"b": pair_metric, "absent": pair_metric}, n_boot=100)
    m = rows(s)
    assert (m["full_records"]["value"], m["full_records"]["n"]) == (9, 9)
    assert math.isnan(m["full_records"]["ci_low"])
    assert rows(s, "color")["custom"]["ci_high"] == 0.6
    with pytest.raises(VopdError, match="missing"):
        analysis.summarize(hand_set(), extra_metrics={"b": lambda df: [{"metric": "x", "value": 1.0}]}, n_boot=10)


def test_failures_are_exactly_the_recoverable_cases():
    records = hand_set()
    records[2] = rec("s1", "box", None, cat="color", error="boom")  # box errors do not matter here
    records.append(rec("s10", "full", False, cat=None))
    records.append(rec("s10", "crop", None, error="timeout"))  # crop errored: not a recoverable case
    out = analysis.failures(records)
    assert [f["sample_id"] for f in out] == ["s2", "s3", "s6"]
    f = out[0]
    assert f["benchmark"] == "b" and f["image"] == "/img/s2.png" and f["boxes"] == BOX
    assert f["question"] == "What colour is object s2?" and f["options"] == ["red", "blue"]
    assert (f["full_response"], f["crop_response"], f["answer"], f["category"]) == ("B", "A", "A", "color")
    assert f["prompt"] == "prompt s2" and f["evidence_area"] == 0.01
    # A parse failure on the full view is wrong: it is recoverable too.
    records.append(rec("s11", "full", True, pf=True, response="I cannot tell"))
    records.append(rec("s11", "crop", True))
    assert "s11" in [f["sample_id"] for f in analysis.failures(records)]
    assert analysis.failures([]) == []


def test_both_right_are_the_cases_read_on_both_views():
    records = hand_set()
    # s9 was asked the full view only (no box): right on full, but with no crop it is no both-right case
    assert [f["sample_id"] for f in analysis.both_right(records)] == ["s1", "s7"]
    records.append(rec("s12", "full", True, pf=True, response="maybe A"))  # a parse failure is never right
    records.append(rec("s12", "crop", True))
    out = analysis.both_right(records)
    assert [f["sample_id"] for f in out] == ["s1", "s7"]
    assert set(out[0]) == set(analysis.failures(records)[0])  # the same record form as failures.jsonl
    assert (out[0]["full_response"], out[0]["crop_response"]) == ("A", "A")
