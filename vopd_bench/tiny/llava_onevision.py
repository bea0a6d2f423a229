"""Tiny LLaVA-OneVision: a SigLIP tower, a Qwen2 decoder and ChatML turns.

The prompt holds one `<image>` per image (followed by a newline); the processor repeats it once per feature:
the base view's patch grid, then the "anyres" tiles of the best-fitting grid pinpoint with one newline feature
per row. Images of different shapes therefore give different token counts and different numbers of tiles,
which is what makes this family's batches ragged (`pixel_values` padded per image, `image_sizes` alongside).
"""

from __future__ import annotations

from vopd_bench.tiny.spec import (
    TEXT_HEADS,
    TEXT_HIDDEN,
    TEXT_INTERMEDIATE,
    TEXT_KV_HEADS,
    TEXT_LAYERS,
    Family,
    TokenSpec,
    message_loop,
)

VISION = ("<image>", "<video>")
TEMPLATE = (message_loop("<image>\n", turn_open="<|im_start|>", turn_close="<|im_end|>\n")
            + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOKENS = TokenSpec(specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", *VISION), eos="<|im_end|>",
                   pad="<|endoftext|>", vision=VISION, chat_template=TEMPLATE)

# 32 px base view, 8 px patches: 16 features per view; tiles on a 1x1, 1x2 or 2x1 grid of 32 px views.
SIDE = 32
PATCH = 8
PINPOINTS = [[SIDE, SIDE], [SIDE, 2 * SIDE], [2 * SIDE, SIDE]]


def qwen2_text(tokenizer) -> dict:
    return dict(model_type="qwen2", hidden_size=TEXT_HIDDEN, intermediate_size=TEXT_INTERMEDIATE,
                num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_KV_HEADS,
                vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)


def assemble(tokenizer):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    image_processor = LlavaOnevisionImageProcessor(size={"height": SIDE, "width": SIDE},
                                                   image_grid_pinpoints=PINPOINTS)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": SIDE, "width": SIDE})
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=video_processor,
                                        num_image_tokens=(SIDE // PATCH) ** 2, vision_feature_select_strategy="full",
                                        chat_template=TEMPLATE, image_token="<image>", video_token="<video>")
    config = LlavaOnevisionConfig(
        text_config=qwen2_text(tokenizer),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=SIDE, patch_size=PATCH,
                           vision_use_head=False),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS,
        tie_word_embeddings=True,
    )
    return processor, config


FAMILIES = (Family("llava-onevision", TOKENS, assemble, "LlavaOnevisionForConditionalGeneration"),)
