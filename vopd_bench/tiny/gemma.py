"""Tiny Gemma families: Gemma 3 and Gemma 4.

Gemma 3 writes `<start_of_image>` where an image goes; its processor expands that to
`\\n\\n<start_of_image>` + `<image_soft_token>` x mm_tokens_per_image + `<end_of_image>\\n\\n`. Turns are
`<start_of_turn>user|model ... <end_of_turn>`, the prompt starts with `<bos>`, and generation ends at `<eos>` or
`<end_of_turn>`. A SigLIP tower's patch grid is average-pooled down to a fixed number of soft tokens.

Gemma 4 writes `<|image|>`, expanded to `<|image>` + `<|image|>` x soft tokens + `<image|>`, where the number of
soft tokens follows the image's aspect ratio (at most `max_soft_tokens`). Turns are `<|turn>user|model ...
<turn|>`. Its processor also carries an audio feature extractor and requires the audio tokens to exist, and
the decoder adds per-layer token embeddings (as the small E2B/E4B checkpoints do).
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


GEMMA4_VISION = ("<|image>", "<image|>", "<|image|>", "<|video|>")
GEMMA4_TEMPLATE = (
    "{{ bos_token }}"
    + message_loop("<|image|>", turn_open="<|turn>", turn_close="<turn|>\n", role_names={"assistant": "model"})
    + "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
GEMMA4_TOKENS = TokenSpec(
    specials=("<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", *GEMMA4_VISION, "<|audio>", "<audio|>",
              "<|audio|>"),
    eos="<eos>", pad="<pad>", bos="<bos>", stop=("<turn|>",), vision=GEMMA4_VISION,
    named={"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
           "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>",
           "sot_token": "<|turn>", "eot_token": "<turn|>"},
    chat_template=GEMMA4_TEMPLATE,
)

# 4 px patches pooled 2x2; 70 soft tokens (the smallest budget the processor allows) cap an image at 280
# patches, e.g. 64x64 px -> 16x16 patches -> 64 soft tokens.
GEMMA4_PATCH = 4
GEMMA4_POOL = 2
GEMMA4_SOFT_TOKENS = 70


def assemble_gemma4(tokenizer):
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    pixels = dict(patch_size=GEMMA4_PATCH, pooling_kernel_size=GEMMA4_POOL, max_soft_tokens=GEMMA4_SOFT_TOKENS)
    processor = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                                image_processor=Gemma4ImageProcessor(**pixels), tokenizer=tokenizer,
                                video_processor=Gemma4VideoProcessor(**pixels), chat_template=GEMMA4_TEMPLATE,
                                image_seq_length=GEMMA4_SOFT_TOKENS)
    text = _gemma_text(tokenizer)
    text.pop("query_pre_attn_scalar")
    text.update(global_head_dim=HEAD_DIM, hidden_size_per_layer_input=8, vocab_size_per_layer_input=len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma4Config(
        text_config=text,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, patch_size=GEMMA4_PATCH,
                           pooling_kernel_size=GEMMA4_POOL, position_embedding_size=256),
        boi_token_id=ids("<|image>"), eoi_token_id=ids("<image|>"), image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"), boa_token_id=ids("<|audio>"), eoa_token_index=ids("<audio|>"),
        audio_token_id=ids("<|audio|>"), tie_word_embeddings=True,
    )
    return processor, config


FAMILIES = (
    Family("gemma3", GEMMA3_TOKENS, assemble_gemma3, "Gemma3ForConditionalGeneration"),
    Family("gemma4", GEMMA4_TOKENS, assemble_gemma4, "Gemma4ForConditionalGeneration"),
)
