"""Tiny real-architecture VLMs built entirely offline, for tests and the toy model.

`build_tiny_vlm` builds the original tiny Qwen2-VL (the toy model starts from it, so it stays bit-identical).
`build_tiny(family, out_dir)` builds a tiny random checkpoint of any family in `TINY_FAMILIES` with that
family's own transformers processor, special tokens and chat-template format, loadable offline through
`AutoProcessor` / `AutoModelForImageTextToText`.
"""

from vopd_bench.tiny.families import TINY_FAMILIES, build_tiny, tiny_vision_tokens
from vopd_bench.tiny.qwen2_vl import (
    CHAT_TEMPLATE,
    DEFAULT_CORPUS,
    SPECIAL_TOKENS,
    VISION_TOKENS,
    TinyVLMConfig,
    build_config,
    build_processor,
    build_tiny_vlm,
    build_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE", "DEFAULT_CORPUS", "SPECIAL_TOKENS", "TINY_FAMILIES", "VISION_TOKENS", "TinyVLMConfig",
    "build_config", "build_processor", "build_tiny", "build_tiny_vlm", "build_tokenizer", "tiny_vision_tokens",
]
