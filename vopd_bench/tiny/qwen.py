"""Tiny Qwen-VL families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE) and Qwen3.5.

All share ChatML turns (`<|im_start|>role ... <|im_end|>`) and one image markup,
`<|vision_start|><|image_pad|><|vision_end|>`, which the processor expands to one `<|image_pad|>` per merged
2x2 patch group. Images are pinned to a fixed pixel budget, so a crop costs as many tokens as a full image.
"""

from __future__ import annotations

from vopd_bench.tiny.qwen2_vl import TinyVLMConfig, build_config
from vopd_bench.tiny.spec import (
    HEAD_DIM,
    TEXT_HEADS,
    TEXT_HIDDEN,
    TEXT_INTERMEDIATE,
    TEXT_KV_HEADS,
    TEXT_LAYERS,
    Family,
    TokenSpec,
    message_loop,
)

VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *VISION)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VISION_DIM = 32

_CHATML = message_loop(IMAGE, turn_open="<|im_start|>", turn_close="<|im_end|>\n")
CHAT_TEMPLATE = _CHATML + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
# Qwen3.5 answers after a think block; an empty one unless `enable_thinking=True` is passed to the template.
QWEN35_CHAT_TEMPLATE = _CHATML + (
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking %}<think>\n{% else %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

TOKENS = TokenSpec(specials=SPECIALS, eos="<|im_end|>", pad="<|endoftext|>", vision=VISION,
                   chat_template=CHAT_TEMPLATE)
QWEN35_TOKENS = TokenSpec(specials=(*SPECIALS, "<think>", "</think>"), eos="<|im_end|>", pad="<|endoftext|>",
                          vision=VISION, chat_template=QWEN35_CHAT_TEMPLATE)


def _ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _text(tokenizer, **extra) -> dict:
    return dict(hidden_size=TEXT_HIDDEN, intermediate_size=TEXT_INTERMEDIATE, num_hidden_layers=TEXT_LAYERS,
                num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_KV_HEADS, vocab_size=len(tokenizer),
                max_position_embeddings=4096, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **extra)


def _processor(processor_cls, video_cls, tokenizer, patch: int, side: int, template: str):
    from transformers import Qwen2VLImageProcessor

    # min = max pixels pins every image to side x side: (side / patch / 2)^2 image tokens.
    pixels = side * side
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": pixels, "longest_edge": pixels},
                                            patch_size=patch, merge_size=2, temporal_patch_size=2)
    video_processor = video_cls(patch_size=patch, merge_size=2, temporal_patch_size=2)
    return processor_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                         chat_template=template)


def assemble_qwen2_vl(tokenizer):
    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

    cfg = TinyVLMConfig(text_hidden=TEXT_HIDDEN, text_layers=TEXT_LAYERS, text_heads=TEXT_HEADS,
                        text_kv_heads=TEXT_KV_HEADS, vision_dim=VISION_DIM, vision_layers=1, vision_heads=2)
    return (_processor(Qwen2VLProcessor, Qwen2VLVideoProcessor, tokenizer, 14, 112, CHAT_TEMPLATE),
            build_config(tokenizer, cfg))


def assemble_qwen2_5_vl(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    # head_dim 16: 8 rotary pairs split (temporal, height, width) = 2:3:3, as Qwen's 16:24:24.
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}
    config = Qwen2_5_VLConfig(
        text_config=_text(tokenizer, rope_parameters=rope),
        # window 56 px = 2x2 merged patches per window; layer 1 attends globally, layer 0 within windows.
        vision_config=dict(depth=2, hidden_size=VISION_DIM, intermediate_size=2 * VISION_DIM, num_heads=2,
                           out_hidden_size=TEXT_HIDDEN, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        tie_word_embeddings=True, **_ids(tokenizer),
    )
    return _processor(Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, tokenizer, 14, 112, CHAT_TEMPLATE), config


def _qwen3_vision(**extra) -> dict:
    # 8x8 patches of 16 px at 128 px; learned position embeddings sized to that grid.
    return dict(depth=2, hidden_size=VISION_DIM, intermediate_size=2 * VISION_DIM, num_heads=2,
                out_hidden_size=TEXT_HIDDEN, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                num_position_embeddings=64, **extra)


# head_dim 16: 8 rotary pairs, interleaved over (temporal, height, width) as 4:2:2 (Qwen3-VL: 24:20:20).
_QWEN3_ROPE = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True, "rope_theta": 5e6}


def assemble_qwen3_vl(tokenizer):
    from transformers import Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    config = Qwen3VLConfig(
        text_config=_text(tokenizer, head_dim=HEAD_DIM, rope_parameters=dict(_QWEN3_ROPE)),
        vision_config=_qwen3_vision(deepstack_visual_indexes=[0]),
        tie_word_embeddings=True, **_ids(tokenizer),
    )
    return _processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, tokenizer, 16, 128, CHAT_TEMPLATE), config


def assemble_qwen3_vl_moe(tokenizer):
    from transformers import Qwen3VLMoeConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    text = _text(tokenizer, head_dim=HEAD_DIM, rope_parameters=dict(_QWEN3_ROPE), num_experts=4,
                 num_experts_per_tok=2, moe_intermediate_size=TEXT_INTERMEDIATE // 2, decoder_sparse_step=1)
    config = Qwen3VLMoeConfig(text_config=text, vision_config=_qwen3_vision(deepstack_visual_indexes=[0]),
                              tie_word_embeddings=True, **_ids(tokenizer))
    return _processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, tokenizer, 16, 128, CHAT_TEMPLATE), config


def assemble_qwen3_5(tokenizer):
    from transformers import Qwen3_5Config, Qwen3VLProcessor, Qwen3VLVideoProcessor

    # Rotary on half of head_dim 16: 4 pairs, interleaved 2:1:1. One gated-delta (linear) layer, then one full.
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True, "rope_theta": 1e7,
            "partial_rotary_factor": 0.5}
    text = _text(tokenizer, head_dim=HEAD_DIM, rope_parameters=rope,
                 layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                 linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                 linear_num_value_heads=4)
    config = Qwen3_5Config(text_config=text, vision_config=_qwen3_vision(), tie_word_embeddings=True,
                           **_ids(tokenizer))
    return (_processor(Qwen3VLProcessor, Qwen3VLVideoProcessor, tokenizer, 16, 128, QWEN35_CHAT_TEMPLATE),
            config)


FAMILIES = (
    Family("qwen2-vl", TOKENS, assemble_qwen2_vl, "Qwen2VLForConditionalGeneration"),
    Family("qwen2.5-vl", TOKENS, assemble_qwen2_5_vl, "Qwen2_5_VLForConditionalGeneration"),
    Family("qwen3-vl", TOKENS, assemble_qwen3_vl, "Qwen3VLForConditionalGeneration"),
    Family("qwen3-vl-moe", TOKENS, assemble_qwen3_vl_moe, "Qwen3VLMoeForConditionalGeneration"),
    Family("qwen3.5", QWEN35_TOKENS, assemble_qwen3_5, "Qwen3_5ForConditionalGeneration"),
)
