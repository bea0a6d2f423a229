"""Training examples for the toy, built exactly as the `hf` backend builds its requests at evaluation.

An example is one (sample, view): the view image from `views.render` with the default ViewConfig, the prompt
from the benchmark spec (the box view's hint included), the chat template via `modeling.encode`, and the answer
letter followed by `<|im_end|>` as the target.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from vopd_bench import geometry, views
from vopd_bench.benchmarks.spec import BenchmarkSpec
from vopd_bench.images import load_image
from vopd_bench.modeling import encode
from vopd_bench.samples import Sample
from vopd_bench.views import ViewConfig


@dataclass(frozen=True)
class Example:
    image: Image.Image
    prompt: str
    answer: str  # the option letter


def view_example(sample: Sample, view: str, spec: BenchmarkSpec, cfg: ViewConfig = ViewConfig()) -> Example:
    """One example as the backend sends it: the rendered view and the spec's prompt (with the box hint)."""
    image = load_image(sample.image)
    boxes, _ = views.clamp_boxes(sample.boxes, image.width, image.height)
    rendered = views.render(view, image, sample.question, boxes, cfg)
    return Example(rendered.image, spec.render_prompt(rendered.question, sample.options), sample.answer)


def view_size(sample: Sample, view: str, canvas: int, cfg: ViewConfig = ViewConfig()) -> tuple[int, int]:
    """(width, height) of the view image, from the geometry alone (no rendering)."""
    if view != "crop":
        return canvas, canvas
    x1, y1, x2, y2 = geometry.crop_region(sample.boxes, canvas, canvas, cfg.context, cfg.min_side)
    return max(1, round((x2 - x1) * cfg.zoom)), max(1, round((y2 - y1) * cfg.zoom))


def patch_grid(size: tuple[int, int], image_pixels: int) -> tuple[int, int]:
    """The (height, width) in pixels that the processor resizes an image of `size` to; it sets the token count."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return smart_resize(size[1], size[0], 28, image_pixels, image_pixels)


Planned = tuple[int, str]  # (sample index, view)


def batch_plan(samples: Sequence[Sample], steps: int, batch_size: int, full_fraction: float, seed: int,
               canvas: int, image_pixels: int) -> list[list[Planned]]:
    """`steps` batches of (sample index, view), in a fixed order.

    Samples are visited epoch by epoch in a seeded permutation; each gets the full view with probability
    `full_fraction`, else the crop. Batches are filled per image grid, so every batch has one tensor shape:
    on a CPU a new shape costs a slow first call, and shapes that change every step make training 5-20x slower.
    """
    rng = random.Random(seed)
    buckets: dict[tuple, list[Planned]] = {}
    plan: list[list[Planned]] = []
    while len(plan) < steps:
        order = list(range(len(samples)))
        rng.shuffle(order)
        for i in order:
            view = "full" if rng.random() < full_fraction else "crop"
            key = patch_grid(view_size(samples[i], view, canvas), image_pixels)
            bucket = buckets.setdefault(key, [])
            bucket.append((i, view))
            if len(bucket) == batch_size:
                plan.append(list(bucket))
                bucket.clear()
                if len(plan) == steps:
                    break
    return plan


def encode_with_answers(processor, examples: Sequence[Example]):
    """Model inputs whose last token is the answer letter, and the two target ids per row.

    The prompt part is exactly `modeling.encode` (left-padded); the letter is appended after it. The logits at
    the last two positions must predict (letter, <|im_end|>): that is what greedy decoding then reproduces.
    """
    import torch

    tok = processor.tokenizer
    inputs = encode(processor, [e.image for e in examples], [e.prompt for e in examples])
    letters = []
    for e in examples:
        ids = tok.encode(e.answer, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"answer {e.answer!r} is not a single token")
        letters.append(ids[0])
    letter = torch.tensor(letters, dtype=inputs["input_ids"].dtype).unsqueeze(1)
    eos = torch.full_like(letter, tok.convert_tokens_to_ids("<|im_end|>"))
    inputs["input_ids"] = torch.cat([inputs["input_ids"], letter], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(letter)], dim=1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(letter)], dim=1)
    return inputs, torch.cat([letter, eos], dim=1)
