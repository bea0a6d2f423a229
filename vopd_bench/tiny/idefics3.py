"""Tiny Idefics3 (the architecture of SmolVLM): a SigLIP-style tower, pixel-shuffle connector, a Llama decoder,
and Idefics' own turn format, `User:<image>question<end_of_utterance>\\nAssistant:`.

The processor expands each `<image>` to `<fake_token_around_image><global-img>` + `<image>` x image_seq_len +
`<fake_token_around_image>`; with image splitting on it would also emit `<row_i_col_j>` tiles, so those tokens
exist too. Splitting is off here: one 32 px view per image.
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
)

TILE_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
VISION = ("<fake_token_around_image>", "<image>", "<global-img>", *TILE_TOKENS)
# Roles are capitalised and followed by ':' (no space before an image); the assistant's reply follows
# `Assistant:` directly.
TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
TOKENS = TokenSpec(specials=("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", *VISION),
                   eos="<end_of_utterance>", pad="<|endoftext|>", bos="<|im_start|>", vision=VISION,
                   chat_template=TEMPLATE)

# 32 px views, 4 px patches: an 8x8 grid, pixel-shuffled by 2 into 16 image tokens.
SIDE = 32
PATCH = 4
SCALE = 2
IMAGE_SEQ_LEN = (SIDE // PATCH) ** 2 // SCALE**2


def assemble(tokenizer):
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    image_processor = Idefics3ImageProcessor(size={"longest_edge": SIDE}, max_image_size={"longest_edge": SIDE},
                                             do_image_splitting=False)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=IMAGE_SEQ_LEN, chat_template=TEMPLATE)
    config = Idefics3Config(
        text_config=dict(model_type="llama", hidden_size=TEXT_HIDDEN, intermediate_size=TEXT_INTERMEDIATE,
                         num_hidden_layers=TEXT_LAYERS, num_attention_heads=TEXT_HEADS,
                         num_key_value_heads=TEXT_KV_HEADS, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIDE, patch_size=PATCH),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=SCALE, tie_word_embeddings=True,
    )
    return processor, config


FAMILIES = (Family("idefics3", TOKENS, assemble, "Idefics3ForConditionalGeneration"),)
