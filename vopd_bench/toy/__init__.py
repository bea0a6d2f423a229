"""The toy VLM: a ~1M-parameter Qwen2-VL trained on `synthetic` so that it reads evidence crops well and fails on
full images — a genuine regional-to-global gap that every part of vopd can be demonstrated on, on a CPU.

`vopd_bench/toy/model/` holds the shipped weights (the model `toy`); `python -m vopd_bench.toy.build` rebuilds
them (see MODEL_CARD.md for the exact command and the measured accuracies).
"""

from __future__ import annotations

from vopd_bench.benchmarks.spec import MCQ_PROMPT, OPEN_PROMPT
from vopd_bench.benchmarks.synthetic import COLOURS, QUESTIONS, SHAPES, SyntheticWorld
from vopd_bench.samples import LETTERS
from vopd_bench.tiny import DEFAULT_CORPUS, TinyVLMConfig
from vopd_bench.views import BOX_HINT

# The world the toy is trained and evaluated on: the default `synthetic` world.
TOY_WORLD = SyntheticWorld()

TOY_MODEL_CONFIG = TinyVLMConfig(text_hidden=160, text_layers=3, text_heads=4, text_kv_heads=2,
                                 vision_dim=64, vision_layers=2, vision_heads=4, image_pixels=224 * 224)


def toy_corpus() -> tuple[str, ...]:
    """The tokenizer corpus: every word of the synthetic prompts becomes a single token."""
    lines = [*DEFAULT_CORPUS, MCQ_PROMPT, OPEN_PROMPT, BOX_HINT]
    lines += [QUESTIONS["colour"].format(shape=s) for s in SHAPES]
    lines += [QUESTIONS["shape"].format(colour=c) for c in COLOURS]
    lines += [" ".join(f"({L}) {w}" for L, w in zip(LETTERS, (*COLOURS, *SHAPES), strict=False))]
    return tuple(lines)


__all__ = ["TOY_MODEL_CONFIG", "TOY_WORLD", "toy_corpus"]
