"""The original tiny Qwen2-VL: a byte-level BPE tokenizer trained on an in-memory corpus, the official
Qwen2-VL processor around it, and a randomly initialised Qwen2-VL.

The toy model (`vopd_bench.toy`) starts from `build_tiny_vlm`, and the tests use it wherever they need a model
that loads through the ordinary `from_pretrained` API without hub access.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# A plain Qwen-style chat template: user turns may hold images; the image comes where the message puts it.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_CORPUS = (
    "What colour is the object? What shape is it? Answer with the option's letter from the given choices directly.",
    "Answer the question using a single word or phrase. Select from the following choices.",
    "Only focus on the objects inside the red bounding box in the image to answer this question.",
    "(A) (B) (C) (D) (E) A B C D E yes no red green blue yellow purple orange cyan white black gray",
    "user assistant system The answer is",
)


@dataclass(frozen=True)
class TinyVLMConfig:
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vision_dim: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    image_pixels: int = 224 * 224  # every image is resized to about this many pixels (multiples of 28)
    vocab_size: int = 512
    seed: int = 0


def build_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]), chat_template=CHAT_TEMPLATE, padding_side="left",
    )


def build_processor(tokenizer, image_pixels: int = 224 * 224):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    # min = max pins every image to ~image_pixels: a crop is upsampled to the same token budget as a full image.
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": image_pixels, "longest_edge": image_pixels})
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def build_config(tokenizer, cfg: TinyVLMConfig):
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = cfg.text_hidden // cfg.text_heads
    # mrope sections (temporal, height, width) must sum to head_dim / 2; split it 1:1.5:1.5 like Qwen's 16:24:24.
    half = head_dim // 2
    t = max(1, round(half / 4))
    h = (half - t) // 2
    mrope = [t, h, half - t - h]
    return Qwen2VLConfig(
        text_config=dict(
            hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden, num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads, vocab_size=len(tokenizer),
            max_position_embeddings=4096, rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 1e4},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True,
        ),
        vision_config=dict(depth=cfg.vision_layers, embed_dim=cfg.vision_dim, hidden_size=cfg.text_hidden,
                           num_heads=cfg.vision_heads, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vocab_size=len(tokenizer), tie_word_embeddings=True,
    )


def build_tiny_vlm(out_dir: str | Path | None = None, cfg: TinyVLMConfig = TinyVLMConfig(),
                   corpus: Iterable[str] = DEFAULT_CORPUS):
    """Build (model, processor); save both to `out_dir` when given. Deterministic for a given cfg and corpus."""
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    processor = build_processor(tokenizer, cfg.image_pixels)
    config = build_config(tokenizer, cfg)
    torch.manual_seed(cfg.seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id, pad_token_id=config.text_config.pad_token_id,
        do_sample=False, max_new_tokens=16,
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        (out / "tiny_config.json").write_text(__import__("json").dumps(asdict(cfg), indent=1))
    return model, processor
