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
