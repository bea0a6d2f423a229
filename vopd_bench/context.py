"""Prompt length against the model's context, checked before a request reaches the model.

A prompt longer than the context (minus the tokens to generate) cannot be answered; a model handed one anyway
allocates for the whole sequence first (an 80k-token question made the toy ask for 57 GB). `PromptLength.check`
refuses such a prompt in milliseconds with a per-sample error, "prompt is N tokens; the model's context is M".

Counting never expands anything large: the chat text is tokenised on its own (one image placeholder), and the
image's tokens are computed from its width and height by the processor (`_get_num_multimodal_tokens`, the hook
vLLM uses for the same purpose). Most prompts need no tokenising at all: a byte-level tokeniser makes at most one
token per UTF-8 byte, so bytes + image tokens is an upper bound, and a prompt under the budget by that bound
passes at once. A huge text is counted on growing prefixes until one proves it too long.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vopd_bench.errors import SampleError
from vopd_bench.modeling import chat_text, say_once


def text_context(config: Any) -> int | None:
    """The language model's context from a transformers config: the text config's `max_position_embeddings`."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


class PromptLength:
    """Counts the tokens of one (prompt, image) request as the processor would build it, cheaply."""

    def __init__(self, processor: Any, context: int | None, source: str = "max_position_embeddings"):
        self.processor, self.context, self.source = processor, context, source
        self._chat_text = chat_text
        self._tokenizer = processor.tokenizer
        image_token = getattr(processor, "image_token", None)
        self._image_token_id = self._tokenizer.convert_tokens_to_ids(image_token) if image_token else None
        self._frame: dict[tuple, int] = {}  # chat template kwargs -> UTF-8 bytes of the template around the prompt
        self._image_tokens: dict[tuple[int, int], int] = {}
        self._counts_images = hasattr(processor, "_get_num_multimodal_tokens")
        if context is not None and not self._counts_images:
            say_once("prompt-length-images", f"{type(processor).__name__} cannot count image tokens from an image's size; prompt lengths "
                     "are checked on their text alone")

    def image_tokens(self, width: int, height: int) -> int:
        """Tokens the processor makes for an image of this size (0 when it cannot tell)."""
        if not self._counts_images:
            return 0
        key = (width, height)
        if key not in self._image_tokens:
            data = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
            self._image_tokens[key] = int(data.num_image_tokens[0])
        return self._image_tokens[key]

    def count(self, prompt: str, width: int, height: int, max_chars: int | None = None,
              **template_kwargs: Any) -> int:
        """Tokens of the prompt's chat text with this image in it. With `max_chars`, only that many characters of
        the prompt are tokenised: a lower bound, for texts already known to be far too long."""
        text = self._chat_text(self.processor, prompt[:max_chars] if max_chars else prompt, **template_kwargs)
        ids = self._tokenizer(text)["input_ids"]
        placeholders = ids.count(self._image_token_id) if self._image_token_id is not None else 0
        return len(ids) - placeholders + self.image_tokens(width, height)

    def check(self, prompt: str, sizes: Sequence[tuple[int, int]], max_new_tokens: int,
              **template_kwargs: Any) -> None:
        """Raise SampleError when the prompt with any of these images (each its own sequence, as (width,
        height)) leaves fewer than `max_new_tokens` of the context. A no-op when the context is unknown."""
        if self.context is None:
            return
        budget = self.context - max_new_tokens
        frame = self._frame_bytes(template_kwargs)
        n_bytes = len(prompt.encode("utf-8"))
        for width, height in sizes:
            image = self.image_tokens(width, height)
            if n_bytes + frame + image <= budget:
                continue  # at most one token per byte: certainly fits
            # A long text is counted on growing prefixes until one proves it too long: the work stays a few
            # times the budget whatever the text's size, and at most 4/3 of a full count when it fits.
            chars, more = 2 * max(budget, 1), ""
            while chars < len(prompt):
                n = self.count(prompt, width, height, max_chars=chars, **template_kwargs)
                if n > budget:
                    more = "more than "
                    break
                chars *= 4
            else:
                n = self.count(prompt, width, height, **template_kwargs)
            if n > budget:
                left = f" ({budget} left after {max_new_tokens} new tokens)" if max_new_tokens else ""
                raise SampleError(f"prompt is {more}{n} tokens; the model's context is {self.context}{left}")

    def _frame_bytes(self, template_kwargs: dict[str, Any]) -> int:
        key = tuple(sorted(template_kwargs.items()))
        if key not in self._frame:
            self._frame[key] = len(self._chat_text(self.processor, "", **template_kwargs).encode("utf-8")) + 8
        return self._frame[key]


def for_model(config: Any, processor: Any) -> PromptLength:
    """The check for a transformers model: its text config's `max_position_embeddings`."""
    context = text_context(config)
    if context is None:
        say_once("prompt-length-context", "the model's config gives no max_position_embeddings; prompt lengths are not checked")
    return PromptLength(processor, context)


def for_vllm(engine: Any, model_path: str, *, trust_remote_code: bool = False) -> PromptLength | None:
    """The check for a vLLM engine: its `max_model_len` (the served limit, --max-model-len included), counted
    with the model's own transformers processor. None, said once, when either is unavailable: vLLM still refuses
    an over-long prompt itself, but then the whole batch is retried one request at a time."""
    try:
        context = int(engine.llm_engine.model_config.max_model_len)
    except (AttributeError, TypeError, ValueError):
        say_once("prompt-length-vllm", "this vLLM engine does not report max_model_len; prompt lengths are left to vLLM")
        return None
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the check is an optimisation over vLLM's own
        say_once("prompt-length-vllm", f"no processor for {model_path} ({type(e).__name__}); prompt lengths are left to vLLM")
        return None
    return PromptLength(processor, context, source="max_model_len")
