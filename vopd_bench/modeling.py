"""Loading a VLM and turning (image, prompt) pairs into model inputs, shared by the `hf` backend and the trainer.

Every prompt is one user turn holding the image first and the text after it, rendered by the model's own chat
template: the layout of the paper's evaluation (paper.md §5; reference_code.md §5.1).
"""

from __future__ import annotations

import os
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
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:  # the hub client logs every retry; the one-line error below says what matters
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass
    path = resolve_model_path(model)
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or path.endswith("/") or local.exists() or path.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        what = "has no config.json" if local.is_dir() else "does not exist"
        raise VopdError(f"model path {path!r} {what}")
    device, torch_dtype = pick_device_dtype(device, dtype)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        net = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        where = "" if looks_local else " (not a local folder, and not found on the hub or in its cache)"
        raise VopdError(f"cannot load model {model!r}{where}: {one_line(e)}") from None
    net.to(device).eval()
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"  # batched generation continues every row from its own end
    return net, processor


def chat_text(processor: Any, prompt: str, add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                         **template_kwargs)


def encode(processor: Any, images: Sequence[Any], prompts: Sequence[str], **template_kwargs: Any):
    """Batch-encode (image, prompt) pairs, left-padded, ready for `generate`."""
    texts = [chat_text(processor, p, **template_kwargs) for p in prompts]
    return processor(text=texts, images=list(images), return_tensors="pt", padding=True)


def vision_token_ids(processor: Any) -> list[int]:
    """Ids that a sampled response must never contain: drawing one breaks the image/token count check."""
    tok = processor.tokenizer
    ids = []
    for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>", "<image>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None:
            ids.append(i)
    return ids
