"""Which image region each image token of the language model stands for, per model family.

Qwen-VL processors resize every image to a multiple of `patch_size × merge_size` pixels and report the patch
grid in `image_grid_thw` (t, h, w). After the vision tower merges `merge_size²` neighbouring patches, the LM
receives one token per merged cell, in row-major order over an (h / merge, w / merge) grid, whatever window
attention or patch merging the tower uses inside (Qwen2.5-VL reorders its windows back before the merger).
Since the resize is uniform, cell (r, c) covers the same fraction of the original image.

Families without such a map (tiling or pooling processors) are refused in one line by `require_support`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vopd_bench.errors import VopdError

# model_type of the checkpoint's config -> the family whose grid rule applies.
QWEN_GRID_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


@dataclass(frozen=True)
class TokenGrid:
    """Request i's image tokens: their sequence positions in raster order and the (rows, cols) grid."""

    positions: list[Any]  # one int tensor per request
    grids: list[tuple[int, int]]


def model_type(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def require_support(model: Any, what: str = "--focus and the selfcrop view") -> None:
    """Raise one line when the model's family has no known token-to-region map."""
    kind = model_type(model)
    if kind not in QWEN_GRID_FAMILIES:
        raise VopdError(f"{what} are not available for model family {kind!r}: its image tokens have no known map "
                        f"to image regions (supported: {', '.join(QWEN_GRID_FAMILIES)})")


def qwen_token_grid(inputs: Any, image_token_id: int, merge_size: int) -> TokenGrid:
    """The Qwen-VL map: one image per request, tokens in row-major order over the merged patch grid."""
    ids = inputs["input_ids"]
    thw = inputs["image_grid_thw"].tolist()
    if len(thw) != ids.shape[0]:
        raise VopdError(f"expected one image per request, got {len(thw)} images for {ids.shape[0]} requests")
    positions, grids = [], []
    for row, (t, h, w) in zip(ids, thw, strict=True):
        pos = (row == image_token_id).nonzero().flatten()
        grid = (h // merge_size, w // merge_size)
        if t != 1 or len(pos) != grid[0] * grid[1]:
            raise VopdError(f"image token count {len(pos)} does not match the processor's grid {t}x{h}x{w} "
                            f"(merge {merge_size})")
        positions.append(pos)
        grids.append(grid)
    return TokenGrid(positions, grids)


def token_grid(model: Any, processor: Any, inputs: Any) -> TokenGrid:
    """The token-to-region map of a batch encoded by `modeling.encode` (one image per request)."""
    require_support(model)
    merge = int(getattr(processor.image_processor, "merge_size", 0)
                or model.config.vision_config.spatial_merge_size)
    return qwen_token_grid(inputs, int(model.config.image_token_id), merge)
