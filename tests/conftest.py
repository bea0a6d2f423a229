import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2-VL saved like any hub model: config, safetensors, tokenizer, processor."""
    from vopd_bench.tiny import build_tiny_vlm

    path = tmp_path_factory.mktemp("tiny-vlm")
    build_tiny_vlm(path)
    return path


@pytest.fixture
def one_thread():
    """A tiny model's ops are too small to split across threads; on a shared CPU two threads are many times
    slower than one. The trainer sets its own count (`threads`); this restores the session's afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
