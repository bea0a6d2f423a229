"""Loading a VLM and turning (image, prompt) pairs into model inputs, shared by the `hf` backend and the trainer.

Every prompt is one user turn holding the image first and the text after it, rendered by the model's own chat
template: the layout of the paper's evaluation (paper.md §5; reference_code.md §5.1).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vopd_bench.errors import VopdError

TOY_DIR = Path(__file__).parent / "toy" / "model"


def resolve_model_path(model: str) -> str:
    """`toy` names the model shipped with the package; anything else is a local folder or a hub id."""
    if model == "toy":
        if not (TOY_DIR / "config.json").is_file():
            raise VopdError(f"the toy model is missing from the package ({TOY_DIR}); rebuild it with `python -m vopd_bench.toy.build`")
        return str(TOY_DIR)
    return model


def one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message: the readable part, without any traceback that follows."""
    s = str(e).strip()
    return s.splitlines()[0][:limit] if s else ""


def pick_device_dtype(device: str | None = None, dtype: str | None = None):
    import torch

    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None or dtype == "auto":
        use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        torch_dtype = torch.bfloat16 if use_bf16 else torch.float32
    else:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return device, torch_dtype


def load_model(model: str, *, device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False):
    """Load (model, processor) for inference. Raises VopdError with one readable line on any failure."""
    from transformers import AutoModelForImageTextToText

    quiet_loading()
    path = resolve_model_path(model)
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or path.endswith("/") or local.exists() or path.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        what = "has no config.json" if local.is_dir() else "does not exist"
        raise VopdError(f"model path {path!r} {what}")
    device, torch_dtype = pick_device_dtype(device, dtype)
    processor = load_processor(path, model, trust_remote_code=trust_remote_code, looks_local=looks_local)
    try:
        net = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except ImportError as e:
        raise VopdError(f"cannot load model {model!r}: {one_line(e)}") from None
    except (OSError, ValueError, KeyError) as e:
        where = "" if looks_local else " (not a local folder, and not found on the hub or in its cache)"
        raise VopdError(f"cannot load model {model!r}{where}: {one_line(e)}") from None
    net.to(device).eval()
    return net, processor


def quiet_loading() -> None:
    """No progress bars and no warnings from transformers and the hub client while loading: the one-line errors
    raised here say what matters."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:  # the hub client logs every retry
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass


def load_processor(path: str, model: str, *, trust_remote_code: bool = False, looks_local: bool = True):
    """The processor of the checkpoint at `path` (`model` names it in errors), its tokenizer padding left."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ImportError as e:  # a processor that needs an optional package (e.g. SmolVLM's num2words)
        raise VopdError(f"cannot load model {model!r}: {one_line(e)}") from None
    except (OSError, ValueError, KeyError) as e:
        where = "" if looks_local else " (not a local folder, and not found on the hub or in its cache)"
        raise VopdError(f"cannot load model {model!r}{where}: {one_line(e)}") from None
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"  # batched generation continues every row from its own end
    return processor


def chat_text(processor: Any, prompt: str, add_generation_prompt: bool = True, n_images: int = 1,
              **template_kwargs: Any) -> str:
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in range(n_images)),
                                             {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                         **template_kwargs)


def encode(processor: Any, images: Sequence[Any], prompts: Sequence[str], **template_kwargs: Any):
    """Batch-encode (image, prompt) pairs, left-padded, ready for `generate`. An element of `images` may also be
    a tuple of images, all placed before that prompt's text.

    Images go nested per prompt (`[[img], [img], …]`): processors that count images per sample (Gemma, Idefics3)
    read a flat list as all images belonging to one prompt.
    """
    nested = [list(im) if isinstance(im, (tuple, list)) else [im] for im in images]
    texts = [chat_text(processor, p, n_images=len(ims), **template_kwargs) for p, ims in zip(prompts, nested, strict=True)]
    return processor(text=texts, images=nested, return_tensors="pt", padding=True)


# Names of config/processor attributes that hold an image, video or audio special token (or its id).
_MEDIA_NAME = re.compile(r"(image|video|vision|img|boi|eoi|audio|boa|eoa)")


def vision_token_ids(processor: Any, config: Any = None) -> list[int]:
    """Ids that a sampled response must never contain: drawing one breaks the next forward's image-token count.

    Derived, not listed: (1) the config's image/video/vision token ids (`image_token_id`, `boi_token_index`, …);
    (2) the processor's and tokenizer's named media tokens (`image_token`, `start_image_token`, `fake_image_token`,
    `global_image_tag`, …); (3) every added/special token the processor inserts when it expands an image, found
    by encoding one small image; (4) what the model's family adds (`vopd_bench.families`). End-of-sequence and
    padding ids are never included.
    """
    tok = getattr(processor, "tokenizer", processor)
    ids: set[int] = set()
    for cfg in (config, getattr(config, "text_config", None)):
        for name, value in (vars(cfg).items() if cfg is not None else ()):
            if name.endswith(("_token_id", "_token_index", "_token_ids")) and _MEDIA_NAME.search(name):
                ids.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
    named = [v for obj in (processor, tok) for k, v in vars(obj).items()
             if isinstance(v, str) and k.endswith(("_token", "_tag")) and _MEDIA_NAME.search(k)]
    named += [str(v) for k, v in (getattr(tok, "_special_tokens_map", None) or {}).items()
              if v is not None and _MEDIA_NAME.search(k)]  # multimodal tokenizers' named tokens (image_token, …)
    ids.update(_single_token_id(tok, t) for t in named)
    ids.update(_image_expansion_ids(processor, tok))
    from vopd_bench.families import family_of

    extra = family_of(config).extra_vision_tokens
    if extra is not None:
        ids.update(extra(tok))
    return sorted({i for i in ids if isinstance(i, int) and i >= 0} - _never_banned(tok, config))


def _single_token_id(tok: Any, text: str) -> int | None:
    i = tok.convert_tokens_to_ids(text)
    return i if isinstance(i, int) and i != tok.unk_token_id else None


def _image_expansion_ids(processor: Any, tok: Any) -> set[int]:
    """The added/special tokens present in an encoded (image, text) prompt and absent from the same text alone."""
    if not callable(getattr(processor, "apply_chat_template", None)) or getattr(processor, "image_processor", None) is None:
        return set()
    from PIL import Image

    try:
        with_image = encode(processor, [Image.new("RGB", (64, 48), (128, 128, 128))], ["x"])["input_ids"][0].tolist()
        plain = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                                              add_generation_prompt=True, tokenize=False)
        text_only = set(tok(plain, add_special_tokens=False)["input_ids"])
    except Exception:  # noqa: BLE001 - the named ids above still apply; the family tests check the union
        return set()
    special = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    return (set(with_image) - text_only) & special


def _never_banned(tok: Any, config: Any) -> set[int]:
    keep = {tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "generation_config", None)):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        keep.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in keep if isinstance(i, int)}


_said: set[str] = set()


def say_once(key: str, message: str) -> None:
    """Print a one-line notice to stderr the first time `key` comes up in this process (a slower path, a split
    batch): never silent, never repeated per batch."""
    if key in _said:
        return
    _said.add(key)
    print(f"note: {message}", file=sys.stderr, flush=True)
