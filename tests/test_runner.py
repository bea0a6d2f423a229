"""gap-report end to end on a tiny random model: CLI, outputs, resume after a kill, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from PIL import Image

from vopd_bench.backends.base import GenerationConfig, Request, Response
from vopd_bench.runner import GapReportConfig, run_gap_report

VOPD = [sys.executable, "-m", "vopd_bench.cli"]


def _run_cli(*args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([*VOPD, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


class EchoBackend:
    """Answers with the letter stored in its script; counts what it was asked."""

    name = "echo"
    preferred_batch_size = 8

    def __init__(self, answer_by_view: dict[str, str]):
        self.answer_by_view = answer_by_view
        self.asked: list[str] = []

    def fingerprint(self) -> str:
        return "echo-1"

    def generate(self, requests: list[Request], gen: GenerationConfig) -> list[Response]:
        self.asked += [r.key for r in requests]
        out = []
        for r in requests:
            view = "box" if "red bounding box" in r.prompt else ("crop" if r.image.width != 224 else "full")
            out.append(Response(self.answer_by_view[view]))
        return out

    def close(self) -> None:
        pass


# The toy's greedy answers to the first six synthetic:test questions, read once off its committed report and
# written here by hand; the true answers are A..F in order (the generator's first six draws).
TOY_ANSWERS = {
    "full": ["A", "D", "D", "A", "E", "D"],  # right on test-00000 and test-00004
    "crop": ["A", "B", "C", "D", "E", "F"],  # all right
    "box": ["F", "D", "D", "D", "E", "D"],   # right on test-00003 and test-00004
}


def test_cli_end_to_end_with_limit(tmp_path):
    """The toy's folder given as a local model: its six answers per view, counted by hand, are the summary's."""
    from vopd_bench.modeling import TOY_DIR

    out = tmp_path / "report"
    # batch size 4 against the committed report's 16: batching must not change a greedy answer
    res = _run_cli("gap-report", str(TOY_DIR), "--limit", "6", "--max-new-tokens", "3", "--out", str(out),
                   "--batch-size", "4")
    assert res.returncode == 0, res.stderr
    for name in ("summary.csv", "samples.jsonl", "failures.jsonl", "both_right.jsonl", "report.md", "run.json",
                 "accuracy.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 18
    for r in records:
        for field in ("benchmark", "sample_id", "view", "response", "parsed", "correct", "error", "key"):
            assert field in r
        assert r["error"] is None
    got = {v: [r["response"] for r in sorted(records, key=lambda r: r["sample_id"]) if r["view"] == v]
           for v in TOY_ANSWERS}
    assert got == TOY_ANSWERS
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == ["benchmark", "category", "metric", "value", "ci_low", "ci_high", "n"]
    s = summary[summary.category == "all"].set_index("metric")
    assert s.loc["n_samples", "value"] == 6
    assert s.loc["acc_full", "value"] == pytest.approx(2 / 6) and s.loc["acc_full", "n"] == 6
    assert s.loc["acc_crop", "value"] == 1.0
    assert s.loc["acc_box", "value"] == pytest.approx(2 / 6)
    assert s.loc["gap", "value"] == pytest.approx(4 / 6)
    # full wrong and crop right on test-00001, -00002, -00003 and -00005; both right on -00000 and -00004
    assert s.loc["recoverable", "value"] == 4 and s.loc["both_right", "value"] == 2
    assert s.loc["parse_fail_full", "value"] == 0 and s.loc["n_sample_errors", "value"] == 0
    ids = [json.loads(x)["sample_id"] for x in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(ids) == ["test-00001", "test-00002", "test-00003", "test-00005"]
    run = json.loads((out / "run.json").read_text())
    assert run["model_fingerprint"].startswith("sha256:") and run["seed"] == 0
    assert run["config"]["limit"] == 6 and "torch" in run["versions"]
    assert run["decoding"] == {"greedy": True, "temperature": 0.0, "top_p": 1.0, "top_k": None,
                               "repetition_penalty": 1.0, "max_new_tokens": 3, "seed": 0}  # the model's defaults off
    assert "synthetic" in res.stdout and "Regional-to-global" in res.stdout


def test_rerun_skips_done_work_and_force_redoes_it(tmp_path):
    cfg = GapReportConfig(model="echo", limit=5, out=str(tmp_path), quiet=True)
    first = EchoBackend({"full": "A", "crop": "B", "box": "C"})
    run_gap_report(cfg, backend=first)
    assert len(first.asked) == 15
    again = EchoBackend({"full": "A", "crop": "B", "box": "C"})
    result = run_gap_report(cfg, backend=again)
    assert again.asked == [] and len(result.records) == 15
    forced = EchoBackend({"full": "A", "crop": "B", "box": "C"})
    cfg.force = True
    run_gap_report(cfg, backend=forced)
    assert sorted(forced.asked) == sorted(first.asked)
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 15


def test_gap_matches_hand_count(tmp_path):
    """A model right only on crops: gap = acc_crop - acc_full, and every sample is recoverable."""
    from vopd_bench import benchmarks

    samples = benchmarks.load("synthetic", limit=8).samples
    answers = {s.id: s.answer for s in samples}

    class CropOracle(EchoBackend):
        def generate(self, requests, gen):
            keyed = super().generate(requests, gen)
            return [Response(self.lookup[r.key]) if k.text == "crop" else k for r, k in zip(requests, keyed, strict=True)]

    backend = CropOracle({"full": "none of them", "crop": "crop", "box": "none"})
    cfg = GapReportConfig(model="echo", limit=8, out=str(tmp_path), quiet=True)
    from vopd_bench.runner import plan_benchmark

    spec = benchmarks.resolve("synthetic")[0]
    plan = plan_benchmark(spec, samples, cfg, "echo-1", GenerationConfig(max_new_tokens=cfg.max_new_tokens, seed=0))
    backend.lookup = {p.key: answers[p.sample.id] for p in plan}
    result = run_gap_report(cfg, backend=backend)
    s = result.summary.set_index(["category", "metric"])
    assert s.loc[("all", "acc_crop"), "value"] == 1.0
    assert s.loc[("all", "acc_full"), "value"] == 0.0
    assert s.loc[("all", "gap"), "value"] == 1.0
    assert s.loc[("all", "recoverable"), "value"] == 8
    # Parse failures on full and box are counted as such, not guessed.
    assert s.loc[("all", "parse_fail_full"), "value"] == 1.0
    failures = [json.loads(x) for x in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["sample_id"] for f in failures) == sorted(answers)
    assert all(f["boxes"] and f["question"] and f["options"] for f in failures)
    assert (tmp_path / "both_right.jsonl").read_text() == ""  # the full view is never right here


def test_killed_run_resumes_to_identical_summary(tiny_model_dir, tmp_path):
    args = ["gap-report", str(tiny_model_dir), "--limit", "8", "--max-new-tokens", "2", "--batch-size", "2", "--quiet",
            "--threads", "1"]
    clean = tmp_path / "clean"  # the uninterrupted run, in this process: the CLI's own path is the killed one's
    run_gap_report(GapReportConfig(model=str(tiny_model_dir), limit=8, max_new_tokens=2, batch_size=2, quiet=True,
                                   out=str(clean), backend_options={"threads": 1}))

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*VOPD, *args, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    samples = killed / "samples.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if samples.exists() and len(samples.read_text().splitlines()) >= 6:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(samples.read_text().splitlines())
    assert 6 <= n_before < 24, "the kill must land mid-run"
    assert not (killed / "summary.csv").exists()

    # the same run resumes (here in this process; the killed one was a process of its own, as it must be)
    run_gap_report(GapReportConfig(model=str(tiny_model_dir), limit=8, max_new_tokens=2, batch_size=2, quiet=True,
                                   out=str(killed), backend_options={"threads": 1}))
    lines = samples.read_text().splitlines()
    keys = [json.loads(x)["key"] for x in lines]
    assert len(keys) == len(set(keys)) == 24
    pd.testing.assert_frame_equal(pd.read_csv(clean / "summary.csv"), pd.read_csv(killed / "summary.csv"))


@pytest.mark.parametrize("args, message", [
    (["gap-report", "toy-that-does-not-exist/", "--quiet"], "does not exist"),
    (["gap-report", "/nonexistent/model", "--quiet"], "does not exist"),
    (["gap-report", "x", "--benchmarks", "nosuchbench", "--quiet"], "unknown benchmark"),
    (["gap-report", "x", "--views", "full,zoomed", "--quiet"], "unknown view"),
    (["gap-report", "x", "--benchmarks", "local:/nonexistent/data.jsonl", "--quiet"], "file not found"),
])
def test_run_level_errors_are_one_line(args, message, tmp_path, monkeypatch, capsys):
    """Through the command's own entry point (`main`), in this process; the next test runs one in a new one."""
    from vopd_bench import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["vopd", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # no empty output folder left behind (runs/<model-slug>/)


def test_a_run_that_fails_in_its_own_process_says_one_line_and_leaves_no_folder(tmp_path):
    # a benchmark file that is not there: found after the output folder was locked, before any model loads
    res = _run_cli("gap-report", "x", "--benchmarks", "local:/nonexistent/data.jsonl", "--quiet", cwd=tmp_path)
    assert res.returncode == 1
    err = res.stderr.strip()
    assert "file not found" in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_per_sample_errors_are_recorded_and_the_run_goes_on(tmp_path):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"not an image at all")
    rows = [
        {"id": "good", "image": "ok.png", "question": "Colour?", "options": ["red", "blue"], "answer": "A",
         "bbox": [10, 10, 30, 30]},
        {"id": "clamped", "image": "ok.png", "question": "Colour?", "options": ["red", "blue"], "answer": "A",
         "bbox": [40, 30, 90, 70]},
        {"id": "corrupt", "image": "corrupt.png", "question": "Colour?", "options": ["red", "blue"], "answer": "A",
         "bbox": [1, 1, 5, 5]},
        {"id": "missing-image", "image": "nope.png", "question": "Colour?", "options": ["red", "blue"], "answer": "A"},
        {"id": "outside", "image": "ok.png", "question": "Colour?", "options": ["red", "blue"], "answer": "B",
         "bbox": [100, 100, 120, 120]},
        {"id": "no-question", "image": "ok.png", "options": ["red", "blue"], "answer": "A"},
        {"id": "nan-box", "image": "ok.png", "question": "Colour?", "options": ["red", "blue"], "answer": "A",
         "bbox": [1, "nan", 5, 5]},
        {"id": "no-box", "image": "ok.png", "question": "Colour?", "options": ["red", "blue"], "answer": "A"},
        {"id": "unlabelled", "image": "ok.png", "question": "Colour?", "options": ["red", "blue"]},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    backend = EchoBackend({"full": "A", "crop": "A", "box": "A"})
    cfg = GapReportConfig(model="echo", benchmarks=[f"local:{data}"], out=str(tmp_path / "out"), quiet=True)
    result = run_gap_report(cfg, backend=backend)
    by = {(r.sample_id, r.view): r for r in result.records}
    assert by[("good", "crop")].correct and by[("good", "crop")].boxes_clamped == 0
    assert by[("clamped", "crop")].error is None and by[("clamped", "crop")].boxes_clamped == 1
    assert by[("clamped", "crop")].boxes == [[40.0, 30.0, 64.0, 48.0]]
    assert "corrupt" in by[("corrupt", "full")].error
    assert "not found" in by[("missing-image", "full")].error
    assert "outside" in by[("outside", "crop")].error
    assert "question" in by[("no-question", "full")].error
    assert "NaN" in by[("nan-box", "full")].error or "nan" in by[("nan-box", "full")].error.lower()
    assert by[("no-box", "full")].correct and ("no-box", "crop") not in by
    assert "not a valid JSON object" in by[("line10", "full")].error
    assert "no reference answer" in by[("unlabelled", "full")].error
    assert all(r.error_kind == "sample" for r in result.records if r.error)
    s = result.summary.set_index(["category", "metric"])
    assert s.loc[("all", "n_no_evidence"), "value"] == 1
    assert s.loc[("all", "boxes_clamped"), "value"] == 1
    # 10 samples (9 rows and the line that is not JSON, `line10`); every one but good, clamped and no-box errs
    assert s.loc[("all", "n_samples"), "value"] == 10
    assert s.loc[("all", "n_sample_errors"), "value"] == 7
    assert s.loc[("all", "n_errors_full"), "value"] == 7
    # no crop or box view for the two samples without a box (missing-image, unlabelled) nor for no-box
    assert s.loc[("all", "n_errors_crop"), "value"] == 5 and s.loc[("all", "n_errors_box"), "value"] == 5


def test_judge_decides_only_what_the_rules_could_not(tmp_path):
    """--judge-base-url: parse failures go to the judge; its verdicts land in the records; a rerun asks nothing."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            self._send({"data": [{"id": "judge-model"}]})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.append(body["messages"][0]["content"])
            self._send({"choices": [{"message": {"role": "assistant", "content": "Yes."}}]})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    judge = {"base_url": f"http://127.0.0.1:{httpd.server_address[1]}/v1", "model": "judge-model"}
    try:
        cfg = GapReportConfig(model="echo", limit=4, out=str(tmp_path), quiet=True, judge=judge)
        result = run_gap_report(cfg, backend=EchoBackend({"full": "hard to say", "crop": "A", "box": "A"}))
        full = [r for r in result.records if r.view == "full"]
        assert len(asked) == 4 and all("hard to say" in a for a in asked)
        assert all(r.correct and not r.parse_failed and r.parsed == "judge:yes" for r in full)
        assert all(r.meta["judge"]["verdict"] == "yes" for r in full)
        assert all("judge" not in r.meta for r in result.records if r.view != "full")
        assert (tmp_path / "judge_cache.jsonl").is_file()
        cfg.force = True
        run_gap_report(cfg, backend=EchoBackend({"full": "hard to say", "crop": "A", "box": "A"}))
        assert len(asked) == 4  # the verdicts came from the cache
    finally:
        httpd.shutdown()
        httpd.server_close()
