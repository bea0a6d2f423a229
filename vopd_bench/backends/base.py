"""The one small interface every backend implements: a batch of requests in, a batch of responses out.

Backends never raise for a single failed request: they return a Response with `error` set, so the run can
record it and go on. They raise VopdError only for run-level problems (model not found, server unreachable
at start-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class GenerationConfig:
    """Settings that change what a model answers; they are part of every record's key."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decoding_settings(gen: GenerationConfig) -> dict[str, Any]:
    """The complete decoding policy every backend applies (run.json records it as `decoding`). The model's own
    `generation_config.json` sampling defaults (e.g. Qwen2.5-VL's repetition_penalty 1.05, top_p, top_k) do not
    apply: they would make answers depend on the backend, since vLLM's explicit sampling parameters skip them.
    Only the stop tokens come from the model. Temperature 0 is greedy; above it, plain sampling."""
    return {"greedy": gen.temperature == 0, "temperature": gen.temperature, "top_p": 1.0, "top_k": None,
            "repetition_penalty": 1.0, "max_new_tokens": gen.max_new_tokens, "seed": gen.seed}


@dataclass(frozen=True)
class Request:
    """One question about one image (or a few: `extra_images` follow `image`, as the paper's self-zoom shows the
    full image and its crop). The backend places the images before the text, as the paper does."""

    key: str
    image: Image.Image
    prompt: str
    extra_images: tuple[Image.Image, ...] = ()

    @property
    def images(self) -> tuple[Image.Image, ...]:
        return (self.image, *self.extra_images)


@dataclass(frozen=True)
class Response:
    text: str
    error: str | None = None  # set when the backend could not answer this request
    seconds: float = 0.0
    tokens: int | None = None  # tokens generated, when the backend knows (throughput in run.json)
    attention: Any = None  # vopd_bench.attention.ImageAttention of the prompt, when the backend captures focus


@runtime_checkable
class Backend(Protocol):
    name: str
    preferred_batch_size: int

    def fingerprint(self) -> str:
        """A stable id of the model weights and anything else that changes its answers."""
        ...

    def generate(self, requests: Sequence[Request], gen: GenerationConfig) -> list[Response]:
        """Answer every request, in order. One Response per Request, never fewer."""
        ...

    def close(self) -> None: ...
