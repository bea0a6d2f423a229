"""The offline tiny-checkpoint builder: every family loads through the Auto classes with its own processor,
turns a nested `[[image], [image]]` batch into inputs the model accepts, generates, and is small and seeded."""

from __future__ import annotations

import hashlib

import pytest
from PIL import Image
from tiny_fixtures import tiny_family_dir  # noqa: F401

from vopd_bench.errors import VopdError
from vopd_bench.tiny import TINY_FAMILIES, build_tiny, tiny_vision_tokens

# family -> (model type, processor class, image-fill tokens for one 64x64 image), the count worked out by hand
# from the builder's sizes:
# - Qwen2/2.5-VL: 64 px is scaled up to the pinned 112x112 = 8x8 patches of 14 px, merged 2x2 -> 16.
# - Qwen3-VL/3.5: 128x128 = 8x8 patches of 16 px, merged 2x2 -> 16.
# - Gemma 3: 16 soft tokens per image, always. InternVL: 8x8 patches of 4 px at 32 px, pixel-shuffled by 0.5
#   -> 16. Idefics3: the same grid, shuffled by 2 -> 16.
# - Gemma 4: 280 patches of 4 px allow 64x64 as is: 16x16 patches, pooled 2x2 -> 64.
# - LLaVA-OneVision: a square image keeps the 1x1 pinpoint grid: 16 base features + 16 tile features + 4 newlines.
EXPECTED = {
    "qwen2-vl": ("qwen2_vl", "Qwen2VLProcessor", 16),
    "qwen2.5-vl": ("qwen2_5_vl", "Qwen2_5_VLProcessor", 16),
    "qwen3-vl": ("qwen3_vl", "Qwen3VLProcessor", 16),
    "qwen3-vl-moe": ("qwen3_vl_moe", "Qwen3VLProcessor", 16),
    "qwen3.5": ("qwen3_5", "Qwen3VLProcessor", 16),
    "gemma3": ("gemma3", "Gemma3Processor", 16),
    "gemma4": ("gemma4", "Gemma4Processor", 64),
    "llava-onevision": ("llava_onevision", "LlavaOnevisionProcessor", 36),
    "internvl": ("internvl", "InternVLProcessor", 16),
    "idefics3": ("idefics3", "Idefics3Processor", 16),
}


def test_every_family_has_an_expectation():
    assert set(EXPECTED) == set(TINY_FAMILIES)
    assert len(TINY_FAMILIES) == 10


def _chat(processor, with_image: bool, question: str) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def _load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path).eval()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_loads_processes_a_nested_batch_and_generates(family, tiny_family_dir, one_thread):  # noqa: F811
    import torch

    model_type, processor_class, n_fill = EXPECTED[family]
    processor, model = _load(tiny_family_dir(family))
    assert model.config.model_type == model_type
    assert type(processor).__name__ == processor_class
    assert sum(p.numel() for p in model.parameters()) < 5_000_000

    prompts = [_chat(processor, True, "What colour is it?"), _chat(processor, True, "Which shape? (A) (B)")]
    square = Image.new("RGB", (64, 64), (200, 30, 30))
    inputs = processor(text=prompts, images=[[square], [square]], return_tensors="pt", padding=True)
    fill_counts = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert fill_counts == [n_fill, n_fill]

    # Different image shapes in one batch: the model itself checks its image features against the fill tokens.
    wide, tall = Image.new("RGB", (96, 48), (0, 0, 255)), Image.new("RGB", (40, 120), (0, 255, 0))
    inputs = processor(text=prompts, images=[[wide], [tall]], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(logits).all()
    assert out.shape[0] == 2 and 1 <= out.shape[1] - inputs["input_ids"].shape[1] <= 3


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_vision_tokens_are_special_and_cover_what_the_processor_inserts(family, tiny_family_dir):  # noqa: F811
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_family_dir(family))
    tok = processor.tokenizer
    vision = tiny_vision_tokens(family)
    vision_ids = {tok.convert_tokens_to_ids(t) for t in vision}
    special_ids = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert len(vision_ids) == len(vision) and vision_ids <= special_ids
    for t in vision:  # each is one atomic token
        assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]

    # The special tokens an image brings into a prompt are exactly vision tokens, and some exist.
    image = Image.new("RGB", (64, 64), (10, 10, 10))
    with_image = processor(text=[_chat(processor, True, "Why?")], images=[[image]])["input_ids"][0]
    text_only = processor(text=[_chat(processor, False, "Why?")])["input_ids"][0]
    brought = {i for i in with_image if i in special_ids} - set(text_only)
    assert brought and brought <= vision_ids


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_config_names_its_image_token_among_the_vision_tokens(family, tiny_family_dir):  # noqa: F811
    from transformers import AutoConfig, AutoTokenizer

    path = tiny_family_dir(family)
    config, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    vision = {tok.convert_tokens_to_ids(t) for t in tiny_vision_tokens(family)}
    named = [getattr(config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id", "boi_token_id", "eoi_token_id")
             if getattr(config, k, None) is not None]
    assert config.image_token_id in vision and set(named) <= vision
    assert config.get_text_config().vocab_size == len(tok)


def _weights_digest(path) -> str:
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].float().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("family", ["qwen2.5-vl", "gemma3", "llava-onevision", "gemma4"])
def test_the_same_seed_gives_the_same_weights(family, tiny_family_dir, tmp_path):  # noqa: F811
    first = _weights_digest(tiny_family_dir(family))  # built with seed 0
    assert _weights_digest(build_tiny(family, tmp_path / "again", seed=0)) == first
    assert _weights_digest(build_tiny(family, tmp_path / "other", seed=1)) != first


def test_an_unknown_family_names_the_valid_ones(tmp_path):
    with pytest.raises(VopdError, match="unknown.*'llama-vision'.*qwen2-vl.*idefics3"):
        build_tiny("llama-vision", tmp_path)
    with pytest.raises(VopdError, match="gemma4"):
        tiny_vision_tokens("gemma5")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_next_token_depends_on_the_image_and_is_not_uniform(family, tiny_family_dir, one_thread):  # noqa: F811
    """A test model must see its image (else a dropped image goes unnoticed) and prefer some answers (else a
    distillation step has nothing to move)."""
    import math

    import torch

    processor, model = _load(tiny_family_dir(family))
    prompt = _chat(processor, True, "What colour is it?")
    red, noise = Image.new("RGB", (64, 64), (255, 0, 0)), Image.effect_noise((64, 64), 80).convert("RGB")
    inputs = processor(text=[prompt, prompt], images=[[red], [noise]], return_tensors="pt", padding=True)
    with torch.no_grad():
        logp = model(**inputs).logits[:, -1].float().log_softmax(-1)
    p = logp[0].exp()
    kl = float((p * (logp[0] - logp[1])).sum())
    entropy = float(-(p * logp[0]).sum())
    assert kl > 0.01
    assert 0.5 < entropy < math.log(logp.shape[-1]) - 0.5


# One family per processor (the five Qwen families share one); all ten passed when this was written.
@pytest.mark.parametrize("family", ["qwen2.5-vl", "gemma3", "gemma4", "llava-onevision", "internvl", "idefics3"])
def test_the_released_checkpoint_layout_special_tokens_last_and_a_padded_vocab(family, tmp_path, one_thread):
    import torch

    path = build_tiny(family, tmp_path, specials_last=True, extra_vocab=13)
    processor, model = _load(path)
    tok = processor.tokenizer
    special = {tok.convert_tokens_to_ids(t) for t in tok.added_tokens_encoder} | set(tok.all_special_ids)
    vision = {tok.convert_tokens_to_ids(t) for t in tiny_vision_tokens(family)}
    ordinary = set(tok.get_vocab().values()) - special
    assert min(vision) > max(ordinary)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) + 13

    prompt = _chat(processor, True, "What colour is it?")
    square = Image.new("RGB", (64, 64), (200, 30, 30))
    inputs = processor(text=[prompt, prompt + " "], images=[[square], [square]], return_tensors="pt", padding=True)
    assert (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == [EXPECTED[family][2]] * 2
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2
