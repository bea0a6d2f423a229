"""Where the model looks: the attention from the last prompt position to the image tokens, per LM layer.

Only that one query row is computed. While `capture_last_row` is active, every attention layer of the language
model runs its usual kernel (sdpa, flash, eager) and, in the prefill pass only, one extra small product: the last
query against the layer's keys, softmaxed and averaged over heads. That costs batch × heads × length numbers per
layer; the full length × length attention matrix is never materialised.

The last prompt position is the one that predicts the first answer token (the chat template ends with the
assistant header), which is the position the focus hypothesis is about.

`evidence_share` turns a map into the focus numbers: the *share* of the image attention that falls on the image
tokens whose cell lies in the evidence (a fraction in [0, 1]), and beside it the evidence's *area*, its share
of the image tokens: the share a uniform spread of attention would give it. Cells that the evidence only partly
covers count by the covered fraction, so a box smaller than one cell still has an area.

One layer is read (`default_layer`: the family's depth from `vopd_bench.families`, or `--focus-layer`), as the
published method reads one layer chosen on validation data.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vopd_bench.geometry import Box

BANDS = ("early", "middle", "late")
DEFAULT_BAND = "middle"
_IMPL_NAME = "vopd_last_row"
_SUBSAMPLE = 8  # coverage of a cell by the evidence is measured on an 8 × 8 lattice of points inside it


@dataclass(frozen=True)
class ImageAttention:
    """Head-mean attention from the last prompt position to each image token, per captured LM layer.

    `maps[i]` is a (rows, cols) grid in the image's raster order (the processor's merged-patch grid); values
    are the raw softmax mass, so `maps[i].sum()` is the share of that layer's attention that went to the image.
    `image_size` is (width, height) of the image as the model was given it, before the processor's resize;
    the grid covers it uniformly.
    """

    layers: tuple[int, ...]
    maps: np.ndarray  # (n_layers, rows, cols), float32
    image_size: tuple[int, int]

    def band(self, name: str = DEFAULT_BAND) -> np.ndarray:
        """The mean map over one third of the captured layers (early, middle or late)."""
        return self.maps[band_slice(len(self.layers), name)].mean(axis=0)

    def layer(self, index: int) -> np.ndarray:
        """The map of one LM layer (its `layer_idx`)."""
        if index not in self.layers:
            raise ValueError(f"layer {index} was not captured (captured: {list(self.layers)})")
        return self.maps[self.layers.index(index)]


def band_slice(n_layers: int, name: str) -> slice:
    """Layers split into thirds as evenly as numpy's array_split does; the middle third is the default band."""
    if name not in BANDS:
        raise ValueError(f"unknown layer band {name!r}; expected one of {', '.join(BANDS)}")
    parts = np.array_split(np.arange(n_layers), 3)
    i = BANDS.index(name)
    part = parts[i] if len(parts[i]) else parts[1] if len(parts[1]) else parts[0]  # fewer than 3 layers
    return slice(int(part[0]), int(part[-1]) + 1)


# ---- geometry of the token grid ------------------------------------------------------------------------------


def cell_coverage(boxes: Sequence[Box], image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """For each grid cell, the fraction of its area inside the union of `boxes` (pixels of `image_size`).

    Measured on a regular lattice of points per cell, so it is exact for boxes aligned to the lattice and
    within 1/8 of a cell side otherwise; overlapping boxes are counted once.
    """
    w, h = image_size
    rows, cols = grid
    s = _SUBSAMPLE
    ys = (np.arange(rows * s) + 0.5) * (h / (rows * s))
    xs = (np.arange(cols * s) + 0.5) * (w / (cols * s))
    inside = np.zeros((rows * s, cols * s), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        inside |= ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]
    return inside.reshape(rows, s, cols, s).mean(axis=(1, 3))


class BadAttention(ValueError):
    """A map that cannot be read as a distribution of attention (zero, negative or non-finite mass)."""


def check_map(att_map: np.ndarray, what: str = "attention map") -> np.ndarray:
    """The map as float64, or BadAttention naming why it cannot be used: a NaN or infinite value, a negative
    value, or no mass at all. A window or a share taken from such a map would be an artefact."""
    m = np.asarray(att_map, dtype=np.float64)
    if not np.isfinite(m).all():
        raise BadAttention(f"the {what} has {int((~np.isfinite(m)).sum())} non-finite value(s)")
    if (m < 0).any():
        raise BadAttention(f"the {what} has {int((m < 0).sum())} negative value(s)")
    if m.sum() <= 0:
        raise BadAttention(f"the {what} has no mass (all {m.size} values are 0)")
    return m


@dataclass(frozen=True)
class EvidenceShare:
    """`share`: attention on the evidence / attention on the whole image, per layer; `area`: the evidence's share
    of the image tokens, the share a uniform spread would give it. Both fractions in [0, 1]."""

    layers: tuple[int, ...]
    shares: tuple[float, ...]
    area: float

    def at(self, layer: int) -> float:
        return self.shares[self.layers.index(layer)]


def evidence_share(att: ImageAttention, boxes: Sequence[Box]) -> EvidenceShare | None:
    """The evidence share of every captured layer; None when the boxes cover no image token. BadAttention when a
    layer's map is unusable (see `check_map`)."""
    cov = cell_coverage(boxes, att.image_size, att.maps.shape[1:])
    area = float(cov.mean())
    if area <= 0:
        return None
    shares = []
    for layer, m in zip(att.layers, att.maps, strict=True):
        m = check_map(m, f"attention map of layer {layer}")
        shares.append(min(1.0, float((m * cov).sum() / m.sum())))  # ≤ 1 up to rounding; clipped so it reads as one
    return EvidenceShare(att.layers, tuple(shares), min(1.0, area))


def default_layer(layers: Sequence[int], depth: float) -> int:
    """The captured layer at `depth` (a fraction) of the LM's attention layers: `layers[floor(depth × n)]`. With
    Qwen2.5-VL-3B's 36 layers and depth 22/36 that is layer 22, the published method's choice."""
    if not layers:
        raise ValueError("no attention layers")
    return int(layers[min(len(layers) - 1, int(depth * len(layers)))])


def resolve_layer(model: Any, override: int | None) -> int:
    """The LM layer `--focus` and the paper's self-zoom read: `override` when given (it must be an attention
    layer of this model), else the family's default depth. One line (VopdError) when neither works."""
    from vopd_bench.errors import VopdError
    from vopd_bench.families import family_of

    layers = [m.layer_idx for m in text_attention_modules(model)]
    if override is not None:
        if override not in layers:
            shown = f"{layers[0]}–{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
            raise VopdError(f"--focus-layer {override} is not an attention layer of this model (its layers: {shown})")
        return override
    depth = family_of(model.config).focus_depth
    if depth is None:
        raise VopdError(f"model family {getattr(model.config, 'model_type', '?')!r} has no default focus layer: "
                        "name one with --focus-layer")
    return default_layer(layers, depth)


def require_backend(name: str, capable: bool | None = None) -> None:
    """Only the hf backend runs the model in this process, where its attention can be read."""
    from vopd_bench.errors import VopdError

    if not (capable if capable is not None else name == "hf"):
        raise VopdError(f"the {name} backend cannot expose attention: --focus and the selfcrop view need --backend hf")


def enable(backend: Any, *, focus: bool, layer: int | None = None) -> int:
    """Check that the backend and model family can expose attention (one line if not), switch focus capture and
    return the layer that will be read (`resolve_layer`)."""
    from vopd_bench.token_grid import require_support

    require_backend(backend.name, capable=hasattr(backend, "prefill_attention"))
    require_support(backend.model)
    chosen = resolve_layer(backend.model, layer)
    backend.capture_focus = focus
    return chosen


# ---- capture -------------------------------------------------------------------------------------------------


@dataclass
class _Capture:
    inner: str  # the attention implementation the model was using
    rows: dict[int, Any] = field(default_factory=dict)  # layer index -> (batch, keys) head-mean attention


def text_attention_modules(model: Any) -> list[Any]:
    """The language model's self-attention modules, in layer order (linear-attention layers have none)."""
    lm = model.model.language_model if hasattr(getattr(model, "model", None), "language_model") else model.get_decoder()
    found = [m for m in lm.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "layer_idx")]
    return sorted(found, key=lambda m: m.layer_idx)


def _last_row(module: Any, query: Any, key: Any, attention_mask: Any, scaling: float | None) -> Any:
    """softmax(q_last · Kᵀ · scale + mask_last) averaged over heads: (batch, keys), in float32."""
    import torch

    b, n_heads, _, d = query.shape
    n_kv = key.shape[1]
    q = query[:, :, -1, :].float().reshape(b, n_kv, n_heads // n_kv, d)  # query heads grouped by their kv head
    scores = torch.einsum("bkgd,bkld->bkgl", q, key.float()) * (scaling if scaling is not None else d ** -0.5)
    if attention_mask is not None and attention_mask.dim() == 2:  # flash kernels get the (batch, keys) padding mask
        scores = scores.masked_fill(~attention_mask[:, None, None, : key.shape[2]].bool(), float("-inf"))
    elif attention_mask is not None:  # (batch, 1, queries, keys): boolean, or additive floats
        m = attention_mask[:, :, -1, : key.shape[2]][:, :, None, :]  # the last query's row, for every head
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    return scores.softmax(dim=-1).mean(dim=(1, 2))


def _last_row_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any,
                        **kwargs: Any) -> Any:
    """Runs the model's own attention kernel and, in the prefill pass, records the last query row."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cap: _Capture = module._vopd_capture
    eager = sys.modules[type(module).__module__].eager_attention_forward  # the family's own eager kernel
    out = ALL_ATTENTION_FUNCTIONS.get_interface(cap.inner, eager)(
        module, query, key, value, attention_mask, *args, **kwargs)
    if query.shape[2] > 1 and module.layer_idx not in cap.rows:  # prefill only; decoding steps see 1 query
        import torch

        with torch.no_grad():
            cap.rows[module.layer_idx] = _last_row(module, query, key, attention_mask, kwargs.get("scaling"))
    return out


@contextmanager
def capture_last_row(model: Any) -> Iterator[dict[int, Any]]:
    """Within the block, the first forward pass records {layer index: (batch, keys) last-row attention}.

    Each language-model attention module gets its own config copy naming a wrapper implementation; the shared
    config (and with it the mask construction and the vision tower) is untouched, and everything is restored
    on exit.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if _IMPL_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(_IMPL_NAME, _last_row_attention)
    modules = text_attention_modules(model)
    if not modules:
        from vopd_bench.errors import VopdError

        raise VopdError(f"no attention layer found in {type(model).__name__}'s language model")
    cap = _Capture(inner=modules[0].config._attn_implementation or "eager")
    saved = []
    for m in modules:
        cfg = copy.copy(m.config)
        cfg._attn_implementation_internal = _IMPL_NAME
        saved.append((m, m.config))
        m.config, m._vopd_capture = cfg, cap
    try:
        yield cap.rows
    finally:
        for m, cfg in saved:
            m.config = cfg
            del m._vopd_capture


def image_attention(rows: dict[int, Any], positions: Sequence[Any], grids: Sequence[tuple[int, int]],
                    sizes: Sequence[tuple[int, int]]) -> list[ImageAttention]:
    """Cut each batch row's image-token attention out of the captured rows and lay it on its grid.

    `positions[i]` are the sequence positions of request i's image tokens in raster order, `grids[i]` its
    (rows, cols) and `sizes[i]` its image's (width, height).
    """
    layers = tuple(sorted(rows))
    stacked = np.stack([rows[layer].cpu().numpy() for layer in layers])  # (n_layers, batch, keys)
    out = []
    for i, (pos, grid, size) in enumerate(zip(positions, grids, sizes, strict=True)):
        pos = np.asarray(pos)
        maps = stacked[:, i, pos].reshape(len(layers), *grid).astype(np.float32)
        out.append(ImageAttention(layers, maps, (int(size[0]), int(size[1]))))
    return out
