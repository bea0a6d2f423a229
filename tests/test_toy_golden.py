"""The golden test of the embedded default: `vopd gap-report toy`, run through the installed CLI exactly as the
README tells a newcomer to run it, in a fresh copy of the checkout, must do real work (backend time > 0), leave
`git status` clean, and reproduce every committed number.

It checks the run against five committed sources, each independently of the code that wrote them:
- `reports/toy/summary.csv`, value by value;
- `reports/toy/samples.jsonl`, answer by answer;
- the README's printed table and the prose around it;
- the toy results page (docs/results/toy.md): its gap-report table and the "before" column of its distill table;
- the model card's accuracy tables.

Any drift fails: a change to decoding, prompts, views, scoring or statistics, or an edit of one committed number.
When a change is meant to move the numbers, regenerate `reports/toy/` with the README's command and update the
README, docs/results/toy.md and the model card to match.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "reports" / "toy"
CARD = ROOT / "vopd_bench" / "toy" / "MODEL_CARD.md"
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results" / "toy.md"
VIEWS = ("full", "crop", "box")
# The whole toy run is this module's fixture: give it the subprocess's own limit, not the suite's 600 s per test
# (on a 2-core machine busy with other work the run took longer than 600 s and the six tests errored).
pytestmark = pytest.mark.timeout(1800)
CANVAS = 224  # synthetic:test images are 224 x 224


def _vopd() -> list[str]:
    script = Path(sys.executable).parent / "vopd"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vopd_bench.cli"]


def _git(cwd: Path, *args: str) -> str:
    res = subprocess.run(["git", "-c", "user.name=vopd-test", "-c", "user.email=test@vopd.invalid", *args], cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _fresh_checkout(dest: Path) -> Path:
    """The checkout as a newcomer's clone has it: the files git tracks (as in this working tree, uncommitted changes
    included, and new files not ignored), committed in a new repository, so `git status` starts clean."""
    listed = _git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in this working tree is not in the clone either
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "the checkout")
    assert _git(dest, "status", "--porcelain") == ""
    return dest


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    """The README's command, at the root of a fresh checkout, so the output lands in the default folder."""
    checkout = _fresh_checkout(tmp_path_factory.mktemp("golden"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([*_vopd(), "gap-report", "toy"], cwd=checkout, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    return checkout / "runs" / "toy", res.stdout


def test_the_first_command_does_real_work_and_leaves_the_checkout_clean(run):
    """Not the committed reports/toy/ resumed (that would ask nothing and rewrite committed files), but a run
    into a folder git ignores."""
    out, stdout = run
    checkout = out.parents[1]
    last = stdout.strip().splitlines()[-1]
    backend = re.search(r"backend (\d+\.\d) s", last)
    assert backend and float(backend.group(1)) > 0, last
    assert "nothing asked" not in last
    assert (out / "summary.csv").is_file() and (out / "report.html").is_file()
    assert _git(checkout, "status", "--porcelain", "--untracked-files=all") == ""


def _summary(path: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with path.open() as f:
        return {(r["benchmark"], r["category"], r["metric"]): r for r in csv.DictReader(f)}


def _samples(path: Path) -> dict[tuple[str, str], dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {(r["sample_id"], r["view"]): r for r in rows}


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


def test_the_summary_equals_the_committed_one(run):
    out, _ = run
    got, want = _summary(out / "summary.csv"), _summary(COMMITTED / "summary.csv")
    assert got.keys() == want.keys()
    drift = [(key, col, got[key][col], want[key][col]) for key in want for col in ("value", "ci_low", "ci_high", "n")
             if not _same(got[key][col], want[key][col])]
    assert not drift, drift[:10]


def test_every_answer_equals_the_committed_one(run):
    out, _ = run
    got, want = _samples(out / "samples.jsonl"), _samples(COMMITTED / "samples.jsonl")
    assert len(want) == 504 * 3 and got.keys() == want.keys()
    fields = ("key", "response", "parsed", "correct", "parse_failed", "error", "boxes")
    drift = [(k, f, got[k][f], want[k][f]) for k in want for f in fields if got[k][f] != want[k][f]]
    assert not drift, drift[:10]
    failures = [json.loads(x)["sample_id"] for x in (out / "failures.jsonl").read_text().splitlines()]
    committed = [json.loads(x)["sample_id"] for x in (COMMITTED / "failures.jsonl").read_text().splitlines()]
    assert failures == committed


def test_run_json_records_the_command_and_the_commit(run):
    out, _ = run
    info = json.loads((out / "run.json").read_text())
    assert info["command"].endswith("gap-report toy"), info["command"]
    assert info["config"]["out"] is None and info["model"] == "toy"
    assert info["config"]["trust_remote_code"] is False  # off unless asked
    assert info["config"]["backend_options"] == {"threads": 1}  # the toy's ops are too small to split
    # a source checkout: the run names the commit it ran from (the fresh checkout's)
    assert info["git_commit"] == _git(out.parents[1], "rev-parse", "HEAD").strip()


# --------------------------------------------------------------------------------------------------------------
# The README and the model card, read back and compared with the run's own records


def _accuracy(records: dict[tuple[str, str], dict], view: str, ids: set[str] | None = None) -> float:
    rows = [r for (sid, v), r in records.items() if v == view and (ids is None or sid in ids)]
    return sum(bool(r["correct"]) for r in rows) / len(rows)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _readme_row() -> list[str]:
    [line] = [x for x in README.read_text().splitlines() if x.startswith("│ synthetic │")]
    return [c.strip() for c in line.strip("│").split("│")]


def test_the_readme_table_is_what_the_cli_prints(run):
    _, stdout = run
    [printed] = [x for x in stdout.splitlines() if x.startswith("│ synthetic │")]
    assert [c.strip() for c in printed.strip("│").split("│")] == _readme_row()


def test_the_readme_numbers_are_the_runs(run):
    out, _ = run
    records = _samples(out / "samples.jsonl")
    acc = {v: _accuracy(records, v) for v in VIEWS}
    s = _summary(out / "summary.csv")

    def gap_cell(metric: str) -> str:
        r = s[("synthetic", "all", metric)]
        return f"{_pct(float(r['value']))} [{_pct(float(r['ci_low']))}, {_pct(float(r['ci_high']))}]"

    # The gaps' point values are differences of the per-view accuracies counted here from the records.
    assert float(s[("synthetic", "all", "gap")]["value"]) == pytest.approx(acc["crop"] - acc["full"])
    assert float(s[("synthetic", "all", "gap_locate")]["value"]) == pytest.approx(acc["box"] - acc["full"])
    p = float(s[("synthetic", "all", "mcnemar_p")]["value"])
    assert _readme_row() == ["synthetic", "504", _pct(acc["full"]), _pct(acc["crop"]), _pct(acc["box"]),
                             gap_cell("gap"), gap_cell("gap_locate"), gap_cell("gap_zoom"),
                             "<0.001" if p < 0.001 else f"{p:.3f}"]
    readme = README.read_text()
    assert f"The gap is {_pct(acc['crop'] - acc['full'])} points." in readme

    # The results page: its gap-report row (signed gaps, CIs on the accuracies too) and the distill table's
    # "before" column, which is this run.
    results = RESULTS.read_text()

    def acc_cell(view: str) -> str:
        r = s[("synthetic", "all", f"acc_{view}")]
        return f"{_pct(float(r['value']))} [{_pct(float(r['ci_low']))}, {_pct(float(r['ci_high']))}]"

    def signed_cell(metric: str) -> str:  # +74.6 [+70.8, +78.2], with the typographic minus
        r = s[("synthetic", "all", metric)]
        v, lo, hi = (f"{100 * float(r[c]):+.1f}".replace("-", "−") for c in ("value", "ci_low", "ci_high"))
        return f"{v} [{lo}, {hi}]"

    [row] = [x for x in results.splitlines() if x.startswith("| synthetic | ")]
    assert [c.strip() for c in row.strip().strip("|").split("|")] == [
        "synthetic", "504", acc_cell("full"), acc_cell("crop"), acc_cell("box"), signed_cell("gap"),
        signed_cell("gap_locate"), signed_cell("gap_zoom"), "< 0.001" if p < 0.001 else f"{p:.3f}"]
    distill = results.split("## Distilling the toy", 1)[1].split("\n#", 1)[0]
    before = {
        "full": acc["full"], "crop": acc["crop"], "box": acc["box"], "gap (crop − full)": acc["crop"] - acc["full"],
        "mean of full and crop": (acc["full"] + acc["crop"]) / 2,
    }
    for label, value in before.items():
        found = re.search(rf"^\| {re.escape(label)} \| ([\d.]+) \|", distill, re.M)
        assert found is not None, label
        assert found.group(1) == _pct(value), (label, found.group(1), _pct(value))


def _card_table(title: str) -> list[list[str]]:
    """The rows of the first markdown table after `title` in the model card."""
    text = CARD.read_text()
    start = text.index(title)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and rule


def test_the_model_card_numbers_are_the_runs(run):
    out, _ = run
    records = _samples(out / "samples.jsonl")
    acc = {v: _accuracy(records, v) for v in VIEWS}
    table = {row[0].split()[0]: row[1] for row in _card_table("## Accuracy")}
    assert table == {v: f"{acc[v]:.3f}" for v in VIEWS}
    assert f"gap (crop − full) = {acc['crop'] - acc['full']:.3f}" in CARD.read_text()

    # By evidence size: the one box's area over the canvas, in the card's bins.
    bins: dict[str, set[str]] = defaultdict(set)
    for (sid, view), r in records.items():
        if view != "full":
            continue
        [(x1, y1, x2, y2)] = r["boxes"]
        rel = (x2 - x1) * (y2 - y1) / CANVAS**2
        label = "< 0.5%" if rel < 0.005 else "0.5–1%" if rel < 0.01 else "1–2%" if rel < 0.02 else "2–5%"
        assert rel < 0.05
        bins[label].add(sid)
    rows = _card_table("By evidence size")
    assert [r[0] for r in rows] == ["< 0.5%", "0.5–1%", "1–2%", "2–5%"]
    for label, n, *accs in rows:
        ids = bins[label]
        assert int(n) == len(ids), label
        assert accs == [f"{_accuracy(records, v, ids):.3f}" for v in VIEWS], label
