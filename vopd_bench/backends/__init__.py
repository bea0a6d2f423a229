"""Backends: `hf` (transformers), `vllm` (offline engine) and `openai` (any OpenAI-compatible server)."""

from __future__ import annotations

from typing import Any

from vopd_bench.backends.base import Backend, GenerationConfig, Request, Response
from vopd_bench.errors import VopdError

BACKENDS = ("hf", "vllm", "openai")


def get_backend(name: str, model: str, **options: Any) -> Backend:
    """Build a backend by name. Heavy imports happen here, only for the backend asked for."""
    if name == "hf":
        from vopd_bench.backends.hf import HFBackend

        return HFBackend(model, **options)
    if name == "vllm":
        from vopd_bench.backends.vllm import VLLMBackend

        return VLLMBackend(model, **options)
    if name == "openai":
        from vopd_bench.backends.openai import OpenAIBackend

        return OpenAIBackend(model, **options)
    raise VopdError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


__all__ = ["Backend", "GenerationConfig", "Request", "Response", "get_backend", "BACKENDS"]
