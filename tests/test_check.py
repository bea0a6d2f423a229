"""`vopd check MODEL`: one line per capability, ok or the first line of the reason."""

from __future__ import annotations

import inspect

import pytest
from typer.testing import CliRunner

from vopd_bench.check import CAPABILITIES, run_check
from vopd_bench.cli import _register_commands, app

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_working_model_passes_every_capability(tiny_model_dir, tmp_path):
    _register_commands()
    res = CliRunner().invoke(app, ["check", str(tiny_model_dir), "--threads", "1", "--keep", str(tmp_path)])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert [line.split("  ")[0].strip() for line in lines] == list(CAPABILITIES)
    assert lines[0].split()[-1] == "(Qwen2VLForConditionalGeneration)"
    fast = lines[CAPABILITIES.index("vision fast path")]
    if _forward_takes_image_features():
        assert all(line.split()[-1] == "ok" for line in lines[1:])
    else:  # an older transformers: the fast path is reported unavailable, with the cause, and does not fail the check
        assert "not available: transformers" in fast and "mm_encoder_outputs" in fast
        assert all(line.split()[-1] == "ok" for line in lines[1:] if line != fast)
    # it really ran them: a gap report of 2 samples × 3 views and one training step each
    assert len((tmp_path / "gap-report" / "samples.jsonl").read_text().splitlines()) == 6
    for run in ("distill-full", "distill-lora"):
        assert len((tmp_path / run / "train_log.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "distill-lora" / "adapter").is_dir() and not (tmp_path / "distill-full" / "adapter").exists()


def test_a_model_that_does_not_load_says_why_once_and_skips_the_rest(tmp_path):
    lines = run_check(str(tmp_path / "nowhere"))
    assert [line.capability for line in lines] == list(CAPABILITIES)
    assert not lines[0].ok and "does not exist" in lines[0].detail
    assert all(line.detail == "skipped: the model did not load" for line in lines[1:])
    _register_commands()
    res = CliRunner().invoke(app, ["check", str(tmp_path / "nowhere")])
    assert res.exit_code == 1


def _forward_takes_image_features() -> bool:
    """Whether this transformers release's Qwen2-VL forward takes precomputed image features (read independently
    of vopd: the class's own signature)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    return "mm_encoder_outputs" in inspect.signature(Qwen2VLModel.forward).parameters


def test_the_fast_path_line_says_when_a_family_has_none(tiny_model_dir, monkeypatch):
    """No vision-once path is reported as unavailable (not a failure); a fast path that disagrees with the plain
    one fails with the size of the difference."""
    from vopd_bench import check
    from vopd_bench.backends.hf import HFBackend
    from vopd_bench.families import GENERIC, QWEN_VL

    backend = HFBackend(str(tiny_model_dir), threads=1)
    line = check._vision_fast_path(backend)
    if not _forward_takes_image_features():
        assert (line.ok, line.required) == (False, False) and "transformers" in line.detail
        return
    assert line.ok
    monkeypatch.setattr("vopd_train.rollout.family_of", lambda config: GENERIC)
    line = check._vision_fast_path(backend)
    assert (line.ok, line.required) == (False, False) and line.detail.startswith("not available: generic models")

    def skewed(base, vision):
        out = QWEN_VL.vision_once(base, vision)
        out.pooler_output = [f + 1.0 for f in out.pooler_output]
        return out

    monkeypatch.setattr("vopd_train.rollout.family_of", lambda config: QWEN_VL.__class__(
        **{**QWEN_VL.__dict__, "vision_once": skewed}))
    line = check._vision_fast_path(backend)
    assert (line.ok, line.required) == (False, True) and line.detail.startswith("hidden states differ")


def test_a_processor_that_needs_a_missing_package_says_which(tiny_model_dir, monkeypatch):
    import transformers

    def needs(*args, **kwargs):
        raise ImportError("Package `num2words` is required to run SmolVLM processor. Install it with "
                          "`pip install num2words`.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs)
    line = run_check(str(tiny_model_dir))[0]
    assert (line.capability, line.ok) == ("load", False)
    assert line.detail == (f"cannot load model {str(tiny_model_dir)!r}: Package `num2words` is required to run "
                           "SmolVLM processor. Install it with `pip install num2words`.")


def test_quiet_prints_only_what_fails(monkeypatch):
    from vopd_bench import check

    def fake(model, *, on_line, **kw):
        lines = [check.CheckLine("load", True, "ok"), check.CheckLine("gap-report", False, "out of memory"),
                 check.CheckLine("vision fast path", False, "not available", required=False)]
        for line in lines:
            on_line(line)
        return lines

    monkeypatch.setattr(check, "run_check", fake)
    _register_commands()
    loud = CliRunner().invoke(app, ["check", "m"], env={"COLUMNS": "200"})
    quiet = CliRunner().invoke(app, ["check", "m", "-q"], env={"COLUMNS": "200"})
    assert len(loud.output.strip().splitlines()) == 3
    assert [x.split()[0] for x in quiet.output.strip().splitlines()] == ["gap-report", "vision"]
    assert loud.exit_code == quiet.exit_code == 1  # a required capability failed
