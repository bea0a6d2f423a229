"""Tiny InternVL (the transformers-native `internvl` classes): an InternViT tower, pixel-shuffle downsampling,
a Qwen2 decoder and ChatML turns.

The prompt holds `<IMG_CONTEXT>` where an image goes; the processor expands it to
`<img>` + `<IMG_CONTEXT>` x (image_seq_length per tile) + `</img>`. Tiling is capped at one tile, so every image
costs the same number of tokens.
"""

from __future__ import annotations

from vopd_bench.tiny.llava_onevision import qwen2_text
from vopd_bench.tiny.spec import Family, TokenSpec, message_loop

VISION = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
TEMPLATE = (message_loop("<IMG_CONTEXT>\n", turn_open="<|im_start|>", turn_close="<|im_end|>\n")
            + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOKENS = TokenSpec(
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", *VISION), eos="<|im_end|>", pad="<|endoftext|>",
    vision=VISION, chat_template=TEMPLATE,
    named={"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
           "video_token": "<video>"},
)

# 32 px tiles, 4 px patches: an 8x8 grid, pixel-shuffled by 0.5 into 16 image tokens.
SIDE = 32
PATCH = 4
DOWNSAMPLE = 0.5
IMAGE_SEQ_LENGTH = int((SIDE // PATCH) ** 2 * DOWNSAMPLE**2)


def assemble(tokenizer):
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor

    image_processor = GotOcr2ImageProcessor(size={"height": SIDE, "width": SIDE}, crop_to_patches=False,
                                            min_patches=1, max_patches=1)
    video_processor = InternVLVideoProcessor(size={"height": SIDE, "width": SIDE})
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=video_processor, image_seq_length=IMAGE_SEQ_LENGTH,
                                  chat_template=TEMPLATE)
    config = InternVLConfig(
        text_config=qwen2_text(tokenizer),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[SIDE, SIDE], patch_size=[PATCH, PATCH]),
        image_token_id=tokenizer.context_image_token_id, image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=DOWNSAMPLE, vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    return processor, config


FAMILIES = (Family("internvl", TOKENS, assemble, "InternVLForConditionalGeneration"),)
