"""Build a tiny random checkpoint of any supported VLM family, offline, in the family's own format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vopd_bench.errors import VopdError
from vopd_bench.tiny import gemma, idefics3, internvl, llava_onevision, qwen
from vopd_bench.tiny.spec import Family, make_tokenizer

_REGISTRY: dict[str, Family] = {f.name: f for f in (*qwen.FAMILIES, *gemma.FAMILIES, *llava_onevision.FAMILIES, *internvl.FAMILIES, *idefics3.FAMILIES)}

TINY_FAMILIES: tuple[str, ...] = tuple(_REGISTRY)

# Weight init std for every sub-model. At transformers' usual 0.02 a 64-wide random model answers almost
# uniformly and almost regardless of its image (next-token KL between two images ~1e-3): a test could not tell a
# dropped image from a seen one, and distillation would have nothing to move. At 0.2 the next-token entropy is
# ~3-5 nats of ln(384) = 5.95 and two images give a KL of 0.05-3; at 0.4 Gemma saturates to one token.
INIT_STD = 0.2


def family(name: str) -> Family:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise VopdError(f"unknown tiny model family {name!r}; valid: {', '.join(TINY_FAMILIES)}") from None


def tiny_vision_tokens(name: str) -> tuple[str, ...]:
    """Every special token that marks or fills an image or video in `name`'s prompts, as the builder defines
    them: the tokens a model of that family must never sample."""
    return family(name).tokens.vision


def build_tiny(name: str, out_dir: str | Path, *, seed: int = 0, specials_last: bool = False,
               extra_vocab: int = 0, adjust_config: Callable[[Any], None] | None = None) -> Path:
    """Save a tiny random `name` checkpoint (weights, config, generation config, tokenizer, processor and chat
    template) to `out_dir`, loadable offline by `AutoProcessor` and `AutoModelForImageTextToText`. The same
    arguments give the same weights.

    Two layouts that released checkpoints have, for testing code against them: `specials_last` gives the special
    tokens the highest ids instead of the lowest; `extra_vocab` makes the model's vocabulary that many rows
    larger than the tokenizer's (as Qwen's 151936 rows for 151665 tokens), ids no text decodes to.
    `adjust_config(config)` changes the family's config in place before the weights are drawn (e.g. another
    head size, as `vopd_bench.tiny.vllm_runnable` needs).
    """
    import torch
    import transformers

    fam = family(name)
    tokenizer = make_tokenizer(fam.tokens, specials_last=specials_last)
    processor, config = fam.assemble(tokenizer)
    if extra_vocab:
        _set_vocab_size(config, len(tokenizer) + extra_vocab)
    if adjust_config is not None:
        adjust_config(config)
    for sub in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if sub is not None and hasattr(sub, "initializer_range"):
            sub.initializer_range = INIT_STD
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model_class)(config)
    _redraw_zero_matrices(model)
    stop = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(fam.tokens.stop))]
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=stop if len(stop) > 1 else stop[0], pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        do_sample=False, max_new_tokens=16,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _redraw_zero_matrices(model) -> None:
    """Some families start a projection at zero (Gemma 3's image projection), which would leave a random model
    blind to its images; draw those from the same normal as the rest (vectors, such as norms, stay as they are)."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, INIT_STD)


def _set_vocab_size(config, size: int) -> None:
    # The text config holds the embedding size; some families keep a copy at the top level, and Gemma 4 a
    # second table of per-layer embeddings over the same ids.
    text = config.get_text_config()
    text.vocab_size = size
    if getattr(text, "vocab_size_per_layer_input", None):
        text.vocab_size_per_layer_input = size
    if config is not text and getattr(config, "vocab_size", None) is not None:
        config.vocab_size = size
