"""Activation recomputation (`--gradient-checkpointing`) that keeps the cache, so prefix sharing still works.

Every decoder layer and vision block keeps only its inputs during the forward pass and runs again in the
backward pass to rebuild what its gradient needs (torch's non-reentrant checkpoint). transformers' own gradient
checkpointing switches the layers' cache off, because a layer writes its keys and values (or, in Qwen3.5's
linear-attention layers, its conv window and recurrent state) into the cache, and running the layer a second time
would write them a second time. Prefix sharing runs on that cache (`prefix.py`).

Here the second run sees the cache exactly as the first one did: before each run of a layer the state of every
cache layer is put back to what it was when the layer first ran (a cache layer's tensors are replaced, not
written into, when it grows: keeping references to them is enough). The recomputed keys and values are then the
first run's, and the gradients equal those of the run without recomputation (`tests/test_prefix_sharing.py`).

The recomputed region is the layer's `forward`, so module hooks (FSDP's gathers) stay outside it.
Outside training or without gradients a layer runs as is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vopd_train.fsdp import block_modules


def enable(model: nn.Module) -> nn.Module:
    """Recompute every decoder layer and vision block of `model` in the backward pass (in place)."""
    for block in block_modules(model):
        if not isinstance(block, _Recomputed):
            block.__class__ = _recomputed_class(type(block))
    return model


def enabled(model: nn.Module) -> bool:
    """Whether `enable` has been applied to any layer of `model`."""
    return any(isinstance(m, _Recomputed) for m in model.modules())


def why_not_replayable(model: nn.Module) -> str | None:
    """None when a replayed layer sees `model`'s cache as its first run did; otherwise why not. Releases of
    transformers before linear-attention cache layers gained their past-recording mode (`record_past`) write the
    conv window and recurrent state back in place, over the tensors the first run read, so no saved reference can
    restore them."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if "linear_attention" not in (getattr(text, "layer_types", None) or ()):
        return None
    try:
        from transformers.cache_utils import LinearAttentionLayer
    except ImportError:  # pragma: no cover - such a release has no linear-attention cache to replay
        return None
    if hasattr(LinearAttentionLayer(), "record_past"):
        return None
    import transformers

    return (f"--gradient-checkpointing cannot replay the linear-attention cache on transformers "
            f"{transformers.__version__} (it is updated in place)")


class _Recomputed:
    """Mixed into a layer's class (as FSDP does with its units), so that a copy of the model (a teacher's deep
    copy) recomputes its own layers and not the original's."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        run = super().forward  # type: ignore[misc]
        if not (self.training and torch.is_grad_enabled()):  # type: ignore[attr-defined]
            return run(*args, **kwargs)
        caches = [v for v in kwargs.values() if _is_cache(v)]
        saved = [_state(c) for c in caches]

        def replay(*inputs: Any) -> Any:
            for c, s in zip(caches, saved, strict=True):
                _restore(c, s)
            return run(*inputs, **kwargs)

        return torch.utils.checkpoint.checkpoint(replay, *args, use_reentrant=False)


_CLASSES: dict[type, type] = {}


def _recomputed_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Recomputed{cls.__name__}", (_Recomputed, cls), {})
    return _CLASSES[cls]


def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(value, Cache)


def _state(cache: Any) -> tuple[list, list[dict]]:
    """The cache's layers and each one's attributes, one level deep (linear-attention layers keep their states
    in dicts that they update by key)."""
    layers = list(getattr(cache, "layers", []))
    return layers, [{k: dict(v) if isinstance(v, dict) else v for k, v in vars(layer).items()} for layer in layers]


def _restore(cache: Any, state: tuple[list, list[dict]]) -> None:
    layers, attrs = state
    if hasattr(cache, "layers"):
        cache.layers[:] = layers
    for layer, saved in zip(layers, attrs, strict=True):
        vars(layer).clear()
        vars(layer).update({k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()})
