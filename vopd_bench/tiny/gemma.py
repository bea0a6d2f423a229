"""Tiny Gemma families: Gemma 3 (and Gemma 4, below).

Gemma 3 writes `<start_of_image>` where an image goes; its processor expands that to
`\\n\\n<start_of_image>` + `<image_soft_token>` x mm_tokens_per_image + `<end_of_image>\\n\\n`. Turns are
`<start_of_turn>user|model ... <end_of_turn>`, the prompt starts with `<bos>`, and generation ends at `<eos>` or
`<end_of_turn>`. A SigLIP tower's patch grid is average-pooled down to a fixed number of soft tokens.
"""

from __future__ import annotations

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

GEMMA3_VISION = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    # Gemma has no system turn: a system message is spoken as a user turn.
    + message_loop("<start_of_image>", turn_open="<start_of_turn>", turn_close="<end_of_turn>\n",
                   role_names={"assistant": "model", "system": "user"})
    + "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3_TOKENS = TokenSpec(
    specials=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *GEMMA3_VISION),
    eos="<eos>", pad="<pad>", bos="<bos>", stop=("<end_of_turn>",), vision=GEMMA3_VISION,
    named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    chat_template=GEMMA3_TEMPLATE,
)

# 64 px images, 8 px patches: an 8x8 grid pooled 2x2 into 16 soft tokens.
GEMMA3_IMAGE_SIDE = 64
GEMMA3_SOFT_TOKENS = 16


def _gemma_text(tokenizer) -> dict:
    return dict(hidden_size=TEXT_HIDDEN, intermediate_size=TEXT_INTERMEDIATE, num_hidden_layers=TEXT_LAYERS,
                num_attention_heads=TEXT_HEADS, num_key_value_heads=TEXT_KV_HEADS, head_dim=HEAD_DIM,
                query_pre_attn_scalar=HEAD_DIM, vocab_size=len(tokenizer), max_position_embeddings=4096,
                sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def assemble_gemma3(tokenizer):
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    side = GEMMA3_IMAGE_SIDE
    image_processor = Gemma3ImageProcessor(size={"height": side, "width": side}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=GEMMA3_TEMPLATE, image_seq_length=GEMMA3_SOFT_TOKENS)
    config = Gemma3Config(
        text_config=_gemma_text(tokenizer),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=side, patch_size=8,
                           vision_use_head=False),
        mm_tokens_per_image=GEMMA3_SOFT_TOKENS,
        boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id, tie_word_embeddings=True,
    )
    return processor, config


FAMILIES = (
    Family("gemma3", GEMMA3_TOKENS, assemble_gemma3, "Gemma3ForConditionalGeneration"),
)
