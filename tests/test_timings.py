"""Run timings: model load, backend and harness seconds and per-view throughput in run.json, and one line at the end
of a run, -q included."""

import json

import pytest
import torch
from typer.testing import CliRunner

from vopd_bench.backends.base import Response
from vopd_bench.backends.hf import generated_lengths
from vopd_bench.backends.openai import completion_tokens
from vopd_bench.timings import RunTimings, ViewThroughput


def test_throughput_and_the_split_of_the_wall_time():
    t = RunTimings(wall_seconds=20.0, model_load_seconds=3.0)
    t.view("full").add(4.0, [2, 3, 5])
    t.view("full").add(1.0, [10])
    t.view("crop").add(2.0, [None, 1])  # a backend that did not count its tokens
    assert t.backend_seconds == 7.0 and t.harness_seconds == 10.0
    full, crop = t.views["full"], t.views["crop"]
    assert (full.requests, full.generated_tokens, full.requests_per_s, full.tokens_per_s) == (4, 20, 0.8, 4.0)
    assert (crop.requests, crop.generated_tokens, crop.requests_per_s, crop.tokens_per_s) == (2, None, 1.0, None)
    d = t.as_dict()
    assert d["views"]["full"] == {"requests": 4, "backend_seconds": 5.0, "generated_tokens": 20,
                                  "requests_per_s": 0.8, "tokens_per_s": 4.0}
    assert t.one_line() == ("time 20.0 s: model load 3.0 s, backend 7.0 s, harness 10.0 s · "
                            "full 0.8 req/s 4.0 tok/s · crop 1.0 req/s – tok/s")
    assert RunTimings(wall_seconds=1.0).one_line().endswith("nothing asked (all answers resumed)")
    assert ViewThroughput().requests_per_s is None


def test_generated_lengths_stop_at_the_first_end_token():
    new = torch.tensor([[5, 6, 2, 2], [5, 2, 0, 0], [7, 8, 9, 4], [3, 9, 6, 1]])
    assert generated_lengths(new, 2) == [3, 2, 4, 4]
    assert generated_lengths(new, [2, 1]) == [3, 2, 4, 4]
    assert generated_lengths(new, None) == [4, 4, 4, 4]


@pytest.mark.parametrize("payload, n", [(b'{"usage": {"completion_tokens": 7}}', 7), (b'{"choices": []}', None),
                                        (b'{"usage": {"completion_tokens": "7"}}', None), (b"not json", None)])
def test_completion_tokens_reads_the_usage(payload, n):
    assert completion_tokens(payload) == n


class CountingBackend:
    """Answers "A" and reports a known number of generated tokens per request: the prompt's length mod 5 + 1."""

    name, preferred_batch_size = "counting", 3

    def fingerprint(self) -> str:
        return "counting"

    def generate(self, requests, gen):
        return [Response("A", tokens=len(r.prompt) % 5 + 1) for r in requests]

    def close(self) -> None:
        pass


def test_run_json_records_the_timings_of_each_view(tmp_path):
    from vopd_bench.runner import GapReportConfig, run_gap_report

    cfg = GapReportConfig(model="counting", limit=4, out=str(tmp_path), quiet=True)
    result = run_gap_report(cfg, backend=CountingBackend())
    info = json.loads((tmp_path / "run.json").read_text())
    t = info["timings"]
    assert t == json.loads(json.dumps(result.timings.as_dict()))
    for view in ("full", "crop", "box"):
        v = t["views"][view]
        expected = sum(len(r.prompt) % 5 + 1 for r in result.records if r.view == view)
        assert v["requests"] == 4 and v["generated_tokens"] == expected
        assert v["requests_per_s"] == pytest.approx(4 / v["backend_seconds"])
        assert v["tokens_per_s"] == pytest.approx(expected / v["backend_seconds"])
    assert t["model_load_seconds"] == 0.0  # the backend was passed in, already loaded
    assert t["harness_seconds"] == pytest.approx(t["wall_seconds"] - t["model_load_seconds"] - t["backend_seconds"])
    assert t["wall_seconds"] >= t["run_seconds"] >= t["backend_seconds"] > 0

    again = run_gap_report(cfg, backend=CountingBackend())  # resumed: nothing asked
    assert again.timings.views == {} and json.loads((tmp_path / "run.json").read_text())["timings"]["views"] == {}


def test_the_end_of_run_line_is_printed_with_and_without_quiet(monkeypatch, tmp_path):
    import pandas as pd

    from vopd_bench import cli, runner

    timings = RunTimings(wall_seconds=9.0, model_load_seconds=1.0)
    timings.view("full").add(4.0, [1, 1])
    summary = pd.DataFrame(columns=["benchmark", "category", "metric", "value", "ci_low", "ci_high", "n"])
    monkeypatch.setattr(runner, "run_gap_report",
                        lambda cfg: runner.GapReportResult(tmp_path, summary, [], timings))
    for flags in (["-q"], []):
        out = CliRunner().invoke(cli.app, ["gap-report", "toy", *flags]).output
        assert out.strip().splitlines()[-1] == timings.one_line()
    assert CliRunner().invoke(cli.app, ["gap-report", "toy", "-q"]).output.strip() == timings.one_line()
