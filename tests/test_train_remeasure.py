"""The before/after comparison against hand-computed values."""

from __future__ import annotations

import pytest

from vopd_bench.records import Record
from vopd_train.remeasure import COLUMNS, before_after_table, held_out_benchmarks


def records(outcomes: dict[str, list[int | None]], cats: list[str]) -> list[Record]:
    out = []
    for view, vals in outcomes.items():
        for i, v in enumerate(vals):
            r = Record(key=f"{view}{i}", benchmark="b", sample_id=f"s{i}", view=view, category=cats[i])
            if v is None:
                r.error = "backend failed"
            else:
                r.correct = bool(v)
            out.append(r)
    return out


CATS = ["c1", "c1", "c2", "c2", "c2"]
BEFORE = {"full": [0, 0, 1, 0, 1], "crop": [1, 1, 1, 0, 1], "box": [0, 1, 1, 0, 1]}
AFTER = {"full": [1, 1, 1, 0, None], "crop": [1, 1, 0, 0, 0], "box": [1, 1, 1, 1, 1]}


def test_before_after_by_hand():
    t = before_after_table(records(BEFORE, CATS), records(AFTER, CATS), n_boot=500)
    assert list(t.columns) == COLUMNS
    row = {(r["category"], r["metric"]): r for r in t.to_dict("records")}
    # sample 4 has no valid full answer after training: it leaves every metric that uses the full view
    full = row[("all", "acc_full")]
    assert (full["before"], full["after"], full["n"]) == (pytest.approx(0.25), pytest.approx(0.75), 4)
    crop = row[("all", "acc_crop")]
    assert (crop["before"], crop["after"], crop["n"]) == (pytest.approx(0.8), pytest.approx(0.4), 5)
    gap = row[("all", "gap")]  # before .75 − .25, after .5 − .75
    assert (gap["before"], gap["after"], gap["delta"]) == (pytest.approx(0.5), pytest.approx(-0.25), pytest.approx(-0.75))
    mean = row[("all", "mean_full_crop")]
    assert (mean["before"], mean["after"]) == (pytest.approx(0.5), pytest.approx(0.625))
    zoom = row[("all", "gap_zoom")]  # crop − box on all 5: before .8 − .6, after .4 − 1
    assert (zoom["before"], zoom["after"], zoom["n"]) == (pytest.approx(0.2), pytest.approx(-0.6), 5)
    for r in t.to_dict("records"):
        assert r["ci_low"] - 1e-12 <= r["delta"] <= r["ci_high"] + 1e-12
        assert r["delta"] == pytest.approx(r["after"] - r["before"])
    # in category c1 both samples go from wrong to right on the full view: the paired CI cannot move
    c1 = row[("c1", "acc_full")]
    assert (c1["delta"], c1["ci_low"], c1["ci_high"], c1["n"]) == (1.0, 1.0, 1.0, 2)


def test_samples_missing_from_one_run_are_left_out():
    before = records({"full": [1, 0, 0]}, ["a", "a", "a"])
    after = records({"full": [1, 1]}, ["a", "a"])
    t = before_after_table(before, after, n_boot=200)
    assert set(t["metric"]) == {"acc_full"}  # no crop or box records: those metrics are absent, not zero
    r = t[(t.category == "all")].iloc[0]
    assert (r["before"], r["after"], r["n"]) == (0.5, 1.0, 2)


def test_held_out_choice():
    assert held_out_benchmarks("benchmark", ["synthetic:train"], "") == ["synthetic:test"]
    # prompts from the test split (a gap-report's failures on it) are not held out from it: validation is
    assert held_out_benchmarks("failures", ["synthetic"], "") == ["synthetic:validation"]
    assert held_out_benchmarks("benchmark", ["synthetic:test"], "") == ["synthetic:validation"]
    assert held_out_benchmarks("benchmark", ["synthetic:train", "local:x.jsonl"], "") == []
    assert held_out_benchmarks("vopd6k", [], "") == []
    assert held_out_benchmarks("vopd6k", [], "vstar, hrbench4k") == ["vstar", "hrbench4k"]
