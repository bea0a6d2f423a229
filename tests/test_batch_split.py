"""A batch that fails is split to isolate the failing request: said once, with the cause, and counted in run.json."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vopd_bench.backends.base import GenerationConfig, Request
from vopd_bench.backends.hf import HFBackend

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def backend(lively_model_dir):
    b = HFBackend(str(lively_model_dir), batch_size=4, threads=1)
    inner = b._generate_batch
    b.clean = inner  # the unpatched path, for the answers each request gets alone

    def fails_with_bad(requests, gen):  # a request that breaks any batch holding it, as a corrupt input would
        if any(r.key == "bad" for r in requests):
            raise RuntimeError("cannot process the image of request bad\nTraceback (most recent call last): ...")
        return inner(requests, gen)

    b._generate_batch = fails_with_bad
    return b


def test_a_failing_request_is_isolated_said_once_and_counted(backend, capsys):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    requests = [Request(k, image, "What colour?") for k in ("a", "bad", "c")]
    gen = GenerationConfig(max_new_tokens=2)
    first = backend.generate(requests, gen)
    second = backend.generate(requests, gen)
    alone = [backend.clean([r], gen)[0].text for r in requests[::2]]
    assert all(alone), alone  # the lively model says something, so equal answers below mean something
    for answers in (first, second):
        assert [a.error is None for a in answers] == [True, False, True]
        assert answers[1].error == "RuntimeError: cannot process the image of request bad"
        assert [answers[0].text, answers[2].text] == alone  # the others in the batch still answer, as alone
    assert backend.batch_splits == 2
    err = capsys.readouterr().err
    assert err.count("note:") == 1  # once per backend, not once per split
    assert "a batch of 3 requests failed (RuntimeError: cannot process the image of request bad)" in err
    assert "Traceback" not in err


def test_run_json_counts_the_splits(tiny_model_dir, tmp_path, capsys):
    from vopd_bench.runner import GapReportConfig, run_gap_report

    b = HFBackend(str(tiny_model_dir), batch_size=2, threads=1)
    inner = b._generate_batch

    def fails_when_batched(requests, gen):
        if len(requests) > 1:
            raise ValueError("batched inputs disagree")
        return inner(requests, gen)

    b._generate_batch = fails_when_batched
    cfg = GapReportConfig(model=str(tiny_model_dir), benchmarks=["synthetic:test"], limit=2, batch_size=2,
                          max_new_tokens=2, out=str(tmp_path), quiet=True, views=("full", "crop"))
    result = run_gap_report(cfg, backend=b)
    assert all(r.error is None for r in result.records) and len(result.records) == 4
    assert json.loads((tmp_path / "run.json").read_text())["batch_splits"] == 2  # one batch of 2 per view
    assert capsys.readouterr().err.count("batched inputs disagree") == 1
