"""What differs between VLM families, in one small named entry per family.

Everything else is family-agnostic: an encoded prompt is whatever the model's own processor returns
(`vopd_train.rollout.EncodedPrompt`), per-token tensors are extended with text values, and the vision tensors
travel with their sequence. A family entry says only:

- `vision_once`: how to run each prompt's image through the vision tower once and hand the features to the
  model's `mm_encoder_outputs` (the fast path shared by a prompt's n rollouts); `None` = the plain path, where
  every sequence carries its own copy of the pixels;
- `tower_inputs`: the processor outputs only the vision tower reads (dropped from the forward when the features
  are passed in; the rest, e.g. Qwen's `image_grid_thw` for M-RoPE positions, still goes to the forward);
- `text_values`: the value a per-token tensor takes over response tokens, where it is not 0 (`input_ids` and
  `attention_mask` are handled by the input layer);
- `vision_pad`: the value a vision tensor is padded with when prompts of different sizes share a batch, where
  it is not 0 (the processors' own convention: zero pixels, zero masks);
- `extra_vision_tokens`: media tokens that the generic derivation (`vopd_bench.modeling.vision_token_ids`)
  cannot see from the config or from encoding one small image;
- `pixel_budget`: the most pixels the family's image processor keeps of any image, read from the processor
  (the hf backend then decodes large JPEGs of full-view-only samples at a reduced size that still covers it);
  `None` = unknown, every image is decoded in full;
- `split_vision`: how to cut the vision tensors of one batched processor call (one image per prompt) into each
  prompt's own, exactly as a call for that prompt alone returns them; `None` = unknown, so the trainer makes
  one processor call per prompt;
- `training_kernels`: changes to the loaded model that keep its arithmetic and only pick faster kernels for
  training (`vopd distill` applies them; the weights and what is saved are untouched);
- `note`: the family's quirk, in one line, for `vopd check` and the README;
- `focus_depth`: where `--focus` and the paper's self-zoom read the attention by default, as a fraction of the
  depth of the language model's attention layers (`vopd_bench.attention.default_layer`); `None` = no default,
  `--focus-layer` must name one;
- `native_side`: the side in pixels of the vision encoder's native input, the base window of the paper's
  self-zoom (`vopd_bench.selfcrop`, method `paper`).

A model type that is not listed here goes through the same generic plain path (`GENERIC`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


def _qwen_image_features(base: Any, vision: Mapping[str, Tensor]) -> Any:
    """Qwen-VL towers take flat patches plus their grid and return one feature tensor per image (`pooler_output`)
    and, for Qwen3-VL, the deepstack features per layer, each again one tensor per image."""
    return base.get_image_features(vision["pixel_values"], vision["image_grid_thw"])


def _qwen_split_vision(vision: Mapping[str, Tensor], n: int) -> list[dict[str, Tensor]] | None:
    """Qwen-VL processors concatenate every image's flat patches (`pixel_values`, `prod(image_grid_thw)` rows per
    image) and keep one grid row per image; nothing is padded, so a batch splits into the per-prompt tensors
    exactly. None for any other layout (videos, several images per prompt)."""
    grid = vision.get("image_grid_thw")
    if grid is None or len(grid) != n or set(vision) != {"pixel_values", "image_grid_thw"}:
        return None
    patches = vision["pixel_values"].split(grid.prod(-1).tolist())
    return [{"pixel_values": patches[i], "image_grid_thw": grid[i:i + 1]} for i in range(n)]


_MATMUL_PATCH_EMBEDS: dict[type, type] = {}


def _qwen_patch_embed_as_matmul(model: Any) -> None:
    """Qwen-VL towers embed each patch with a Conv3d whose kernel equals its stride and its input: one dot product
    per output channel, i.e. a matmul of the flat patches with the flattened kernel, which PyTorch's CPU conv3d
    runs 2-3x slower than `linear` does. Each such module's class is swapped for a subclass whose forward is that
    matmul (a class, not a closure, so a deep copy of the model, e.g. a frozen teacher, reads its own weights)."""
    import torch

    for module in model.modules():
        conv = getattr(module, "proj", None)
        if (type(module).__name__.endswith("PatchEmbed") and isinstance(conv, torch.nn.Conv3d)
                and tuple(conv.kernel_size) == tuple(conv.stride) and not any(conv.padding)
                and conv.groups == 1 and type(module) not in _MATMUL_PATCH_EMBEDS.values()):
            cls = type(module)
            if cls not in _MATMUL_PATCH_EMBEDS:
                _MATMUL_PATCH_EMBEDS[cls] = type(cls.__name__, (cls,), {"forward": _patch_embed_matmul})
            module.__class__ = _MATMUL_PATCH_EMBEDS[cls]


def _patch_embed_matmul(self: Any, hidden_states: Tensor) -> Tensor:
    import torch

    weight = self.proj.weight
    flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
    return torch.nn.functional.linear(flat, weight.reshape(weight.shape[0], -1), self.proj.bias)


def _idefics3_tile_tokens(tokenizer: Any) -> set[int]:
    """Idefics3 names each image split by its grid cell (`<row_1_col_2>`): added tokens that appear in a prompt
    only when an image is large enough to be split, so encoding one small image does not reveal them."""
    return {i for t, i in tokenizer.get_added_vocab().items() if re.fullmatch(r"<row_\d+_col_\d+>", t)}


def _qwen_pixel_budget(image_processor: Any) -> int | None:
    """Qwen-VL processors resize every image to at most `max_pixels`, which transformers 5 keeps as the
    `longest_edge` of their size dict (a pixel count there, not an edge)."""
    size = getattr(image_processor, "size", None)
    budget = getattr(image_processor, "max_pixels", None) or getattr(size, "max_pixels", None)
    if budget is None:
        budget = size.get("longest_edge") if isinstance(size, Mapping) else getattr(size, "longest_edge", None)
    return int(budget) if budget else None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    note: str
    vision_once: Callable[[Any, Mapping[str, Tensor]], Any] | None = None
    tower_inputs: tuple[str, ...] = ("pixel_values",)
    text_values: Mapping[str, int] = field(default_factory=dict)
    vision_pad: Mapping[str, float] = field(default_factory=dict)
    extra_vision_tokens: Callable[[Any], set[int]] | None = None
    pixel_budget: Callable[[Any], int | None] | None = None
    focus_depth: float | None = None
    native_side: int | None = None
    split_vision: Callable[[Mapping[str, Tensor], int], list[dict[str, Tensor]] | None] | None = None
    training_kernels: Callable[[Any], None] | None = None

    def text_value(self, key: str) -> int:
        """What a per-token tensor holds at a response token: 0 (= text) unless the family says otherwise."""
        return self.text_values.get(key, 0)


QWEN_VL = Family(
    "qwen-vl", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"),
    "M-RoPE positions are recomputed from input_ids, image_grid_thw and mm_token_type_ids on every uncached forward; "
    "the vision tower runs once per prompt (Qwen3-VL: with its deepstack features)",
    vision_once=_qwen_image_features,
    pixel_budget=_qwen_pixel_budget,
    # The official code of *MLLMs Know Where to Look* reads Qwen2.5-VL-3B at layer 22 of 36 (0-based) and sizes
    # its windows from 224 px; no other Qwen-VL model has a published layer, so the same depth stands in.
    focus_depth=22 / 36,
    native_side=224,
    split_vision=_qwen_split_vision,
    training_kernels=_qwen_patch_embed_as_matmul,
)
GEMMA = Family(
    "gemma", ("gemma3", "gemma4"),
    "token_type_ids (Gemma 3) / mm_token_type_ids (Gemma 4) mark image tokens, which attend to each other "
    "bidirectionally; response tokens are text (0)",
    vision_pad={"image_position_ids": -1},  # Gemma 4 marks padded patches with position -1
)
LLAVA_ONEVISION = Family(
    "llava-onevision", ("llava_onevision",),
    "pixel_values hold each image's anyres patches, padded per batch; image_sizes unpad them",
)
INTERNVL = Family(
    "internvl", ("internvl",),
    "pixel_values hold every image's tiles back to back; the image tokens say how many belong to each",
)
IDEFICS3 = Family(
    "idefics3", ("idefics3", "smolvlm"),
    "pixel_values hold each prompt's image splits padded with all-zero images, which the model drops; "
    "pixel_attention_mask marks the valid pixels; each split is tagged by a <row_i_col_j> token",
    extra_vision_tokens=_idefics3_tile_tokens,
)
FAMILIES: tuple[Family, ...] = (QWEN_VL, GEMMA, LLAVA_ONEVISION, INTERNVL, IDEFICS3)
GENERIC = Family("generic", (), "the generic path: the processor's outputs as they are, images re-encoded per sequence")


def family_of(config: Any) -> Family:
    """The entry for a transformers config (by `model_type`); `GENERIC` for anything else."""
    model_type = getattr(config, "model_type", None)
    return next((f for f in FAMILIES if model_type in f.model_types), GENERIC)


__all__ = ["FAMILIES", "GENERIC", "Family", "family_of"]
