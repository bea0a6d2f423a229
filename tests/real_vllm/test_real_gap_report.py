"""gap-report with `--backend vllm` on a real engine answers exactly as `--backend hf`, every view, 48 samples, in
float32; the log-probabilities of the answers are compared token by token and recorded."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MEMORY_SHARE

from vopd_bench.backends.base import Request
from vopd_bench.backends.vllm import VLLMBackend, conversation
from vopd_bench.images import load_image
from vopd_bench.modeling import encode, load_model
from vopd_bench.runner import GapReportConfig, run_gap_report

N = 48
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def backend(vllm_tiny):
    b = VLLMBackend(str(vllm_tiny), gpu_memory_utilization=MEMORY_SHARE, max_model_len=512, enforce_eager=True)
    yield b
    b.close()


def _answers(out_dir) -> dict[tuple[str, str], str]:
    rows = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines() if line.strip()]
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]][:3]
    return {(r["sample_id"], r["view"]): r["response"] for r in rows}


COMMON = dict(benchmarks=["synthetic"], views=("full", "crop", "box"), limit=N, max_new_tokens=NEW_TOKENS,
              quiet=True, seed=0)


@pytest.fixture(scope="module")
def hf_report(vllm_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    return run_gap_report(GapReportConfig(model=str(vllm_tiny), backend="hf", out=str(out), batch_size=16,
                                          backend_options={"threads": 1}, **COMMON))


def test_vllm_answers_as_hf_on_every_view(vllm_tiny, backend, hf_report, tmp_path, figures):
    vl = run_gap_report(GapReportConfig(model=str(vllm_tiny), backend="vllm", out=str(tmp_path / "vllm"), **COMMON),
                        backend=backend)
    want, got = _answers(hf_report.out_dir), _answers(vl.out_dir)
    assert len(want) == len(got) == 3 * N
    differ = sorted(k for k in want if want[k] != got[k])
    by_view = {v: sum(1 for k in want if k[1] == v and want[k] == got[k]) for v in ("full", "crop", "box")}
    figures["gap_report_identical_answers"] = {"identical": len(want) - len(differ), "of": len(want), **by_view}
    assert not differ, [(k, want[k], got[k]) for k in differ[:5]]
    assert len(set(want.values())) >= 20  # the answers depend on the image and question: agreement means something
    run = json.loads((vl.out_dir / "run.json").read_text())
    assert run["model_fingerprint"].endswith(":float32")  # the hf backend's dtype on a CPU, not the checkpoint's
    assert set(run["differences_from_hf"]) == {"kernels"}


def test_logprobs_of_the_answers_match_transformers(vllm_tiny, backend, hf_report, figures):
    """vLLM's log-probability of each greedy token against transformers' forward on the same prompt and tokens
    (the full view of the first 16 samples, as gap-report asked them): what importance weights rest on."""
    from vllm import SamplingParams

    from vopd_bench.benchmarks.synthetic import make_samples

    model, processor = load_model(str(vllm_tiny), device="cpu", dtype="float32")
    rows = [json.loads(line) for line in (hf_report.out_dir / "samples.jsonl").read_text().splitlines()]
    prompt = {r["sample_id"]: r["prompt"] for r in rows if r["view"] == "full"}
    samples = make_samples("test", n=16)
    requests = [Request(s.id, load_image(s.image).convert("RGB"), prompt[s.id]) for s in samples]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=0, detokenize=False,
                            stop_token_ids=backend.stop_ids, bad_words=backend.bad_words)
    outs = backend.llm.chat([conversation(r) for r in requests], sampling_params=params, use_tqdm=False)
    diffs = []
    for req, out in zip(requests, outs, strict=True):
        ids = list(out.outputs[0].token_ids)
        enc = encode(processor, [req.image], [req.prompt])
        n = enc["input_ids"].shape[1]
        assert list(out.prompt_token_ids) == enc["input_ids"][0].tolist()
        full = {k: v for k, v in enc.items()}
        full["input_ids"] = torch.cat([enc["input_ids"], torch.tensor([ids])], 1)
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        full["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, len(ids), dtype=torch.long)], 1)
        with torch.no_grad():
            logits = model(**full).logits[0, n - 1:n - 1 + len(ids)].float()
        # the backend's engine reports raw log-probs (vLLM's default): before the ban on the vision tokens
        hf = torch.log_softmax(logits, -1)[torch.arange(len(ids)), ids]
        vl = torch.tensor([step[t].logprob for t, step in zip(ids, out.outputs[0].logprobs, strict=True)])
        diffs.append((hf - vl).abs())
    d = torch.cat(diffs)
    figures["gap_report_logprob_abs_diff"] = {"tokens": len(d), "max": float(d.max()), "mean": float(d.mean())}
    assert float(d.max()) < 2e-2
