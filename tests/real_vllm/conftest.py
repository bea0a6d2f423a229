"""Fixtures of the real-engine tests: a vLLM-runnable tiny checkpoint, a small memory share, and the figures.

These tests start real vLLM engines (vLLM's CPU release on a CPU machine; the same code runs on a GPU). Each
engine reserves its KV cache from host memory, so every engine here gets a small share (`MEMORY_SHARE` of what
the host has available, about 0.3 GiB on a 24 GiB machine under load). The figures the tests measure (answer
agreement, log-probability differences, importance weights) are printed at the end of the run and, when
VOPD_REAL_VLLM_FIGURES names a file, written there as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

MEMORY_SHARE = 0.02
FIGURES: dict[str, object] = {}


@pytest.fixture(scope="session")
def vllm_tiny(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL with head size 32 (vLLM's CPU attention refuses 16 and 40), answers that vary by prompt."""
    from vopd_bench.tiny.vllm_runnable import build_vllm_tiny

    return build_vllm_tiny("qwen2-vl", tmp_path_factory.mktemp("vllm-tiny"))


@pytest.fixture(scope="session")
def figures() -> dict[str, object]:
    return FIGURES


@pytest.fixture(autouse=True)
def _in_process_engine(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vopd's layout; tests also build engines directly
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not FIGURES:
        return
    terminalreporter.section("real-vLLM figures")
    for key, value in FIGURES.items():
        terminalreporter.write_line(f"{key}: {json.dumps(value)}")
    path = os.environ.get("VOPD_REAL_VLLM_FIGURES")
    if path:
        Path(path).write_text(json.dumps(FIGURES, indent=1) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def rollout_engine(vllm_tiny):
    """One real rollout engine per test module (each test starts from the checkpoint's weights: `base_engine`).
    Never two in-process engines at once: shutting one down tears down vLLM's distributed state in the process."""
    from vopd_bench.modeling import load_model
    from vopd_train.rollout_vllm import VLLMRolloutEngine

    model, processor = load_model(str(vllm_tiny), device="cpu", dtype="float32")
    eos = model.generation_config.eos_token_id
    engine = VLLMRolloutEngine(str(vllm_tiny), processor, gpu_memory_utilization=MEMORY_SHARE, dtype="float32",
                               max_model_len=512, enforce_eager=True, config=model.config,
                               eos_token_ids=eos if isinstance(eos, list) else [eos])
    _ = engine.llm
    yield engine
    engine.close()


@pytest.fixture
def base_engine(rollout_engine, vllm_tiny):
    """The shared engine with the checkpoint's weights again (a full sync of a freshly loaded model)."""
    from vopd_bench.modeling import load_model

    model, _ = load_model(str(vllm_tiny), device="cpu", dtype="float32")
    rollout_engine.sync_weights(model)
    return rollout_engine
