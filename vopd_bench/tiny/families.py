"""Build a tiny random checkpoint of any supported VLM family, offline, in the family's own format."""

from __future__ import annotations

from pathlib import Path

from vopd_bench.errors import VopdError
from vopd_bench.tiny import gemma, idefics3, internvl, llava_onevision, qwen
from vopd_bench.tiny.spec import Family, make_tokenizer

_REGISTRY: dict[str, Family] = {f.name: f for f in (*qwen.FAMILIES, *gemma.FAMILIES, *llava_onevision.FAMILIES, *internvl.FAMILIES, *idefics3.FAMILIES)}

TINY_FAMILIES: tuple[str, ...] = tuple(_REGISTRY)


def family(name: str) -> Family:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise VopdError(f"unknown tiny model family {name!r}; valid: {', '.join(TINY_FAMILIES)}") from None


def tiny_vision_tokens(name: str) -> tuple[str, ...]:
    """Every special token that marks or fills an image or video in `name`'s prompts, as the builder defines
    them: the tokens a model of that family must never sample."""
    return family(name).tokens.vision


def build_tiny(name: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny random `name` checkpoint (weights, config, generation config, tokenizer, processor and chat
    template) to `out_dir`, loadable offline by `AutoProcessor` and `AutoModelForImageTextToText`. The same
    family and seed give the same weights."""
    import torch
    import transformers

    fam = family(name)
    tokenizer = make_tokenizer(fam.tokens)
    processor, config = fam.assemble(tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, fam.model_class)(config)
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
