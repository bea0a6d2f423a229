import importlib.util
import os

# The tests run tiny models, whose ops are too small to split across threads: a second thread only spins (and on
# a shared CPU makes a run several times slower). One thread, in this process and in every process a test starts,
# unless the environment says otherwise. Set before torch is imported, which reads it once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The real-engine tests and the vLLM conformance test run in the real-vLLM environment (scripts/real_vllm_tests.sh;
# .ci/run runs them there); an environment without vLLM leaves them out rather than skipping them.
collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["real_vllm", "test_vllm_conformance.py"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from isolation import preserved_global_state  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated():
    """Every test starts from the state the previous one found: `build_tiny_vlm`, `Distiller` and `HFBackend` seed
    the global RNG, the trainer sets torch's thread count, fixtures set environment variables."""
    with preserved_global_state():
        yield


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """A module- or session-scoped fixture is set up before any test's own `_isolated` saves the state, so its
    changes (a model built with a seed, a backend that sets threads) would outlive it: undo them here too."""
    if fixturedef.scope == "function":
        return (yield)
    with preserved_global_state():
        return (yield)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2-VL saved like any hub model: config, safetensors, tokenizer, processor."""
    from vopd_bench.tiny import build_tiny_vlm

    path = tmp_path_factory.mktemp("tiny-vlm")
    build_tiny_vlm(path)
    return path


@pytest.fixture(scope="session")
def lively_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its weights redrawn at a larger scale: its greedy answers depend on both the image and
    the prompt (the tiny model's own answers are empty), so equal answers mean the same pixels and text."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() == 2:
                w.copy_(torch.randn(w.shape, generator=gen) * 0.2)
    out = tmp_path_factory.mktemp("lively-vlm")
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture
def one_thread():
    """A tiny model's ops are too small to split across threads; on a shared CPU two threads are many times
    slower than one. The trainer sets its own count (`threads`); the autouse fixture restores the session's."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def before_after_runs(tmp_path_factory):
    """Two small gap-report runs with scripted answers (tests/report_fixtures.py), `before/` and `after/`, shared
    by the compare, leaderboard and figure tests: they read them and write their own files elsewhere or in new
    folders beside them."""
    import report_fixtures as rf

    return rf.before_and_after_runs(tmp_path_factory.mktemp("runs"), rf.SHARED_N)
