"""Greedy accuracy of a model per view, decoded the way the `hf` backend decodes.

An answer counts as correct only when the whole greedy response is the answer letter: the toy is trained to
say just the letter, so this is stricter than the benchmark scorer and also checks the output format.
"""

from __future__ import annotations

from collections.abc import Sequence

from vopd_bench.benchmarks.spec import BenchmarkSpec
from vopd_bench.modeling import encode, vision_token_ids
from vopd_bench.samples import Sample
from vopd_bench.toy.data import Example, view_example


def greedy_responses(model, processor, examples: Sequence[Example], batch_size: int = 16,
                     max_new_tokens: int = 4) -> list[str]:
    import torch

    bad = [[i] for i in vision_token_ids(processor)] or None
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        inputs = encode(processor, [e.image for e in chunk], [e.prompt for e in chunk]).to(model.device)
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, bad_words_ids=bad,
                                 temperature=None, top_p=None, top_k=None)
        texts = processor.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [t.strip() for t in texts]
    return out


def accuracy_per_view(model, processor, samples: Sequence[Sample], spec: BenchmarkSpec,
                      views: Sequence[str] = ("full", "crop", "box"), batch_size: int = 16) -> dict[str, float]:
    """Fraction of samples whose greedy response is exactly the answer letter, per view."""
    was_training = model.training
    model.eval()
    acc = {}
    for view in views:
        examples = [view_example(s, view, spec) for s in samples]
        responses = greedy_responses(model, processor, examples, batch_size)
        acc[view] = sum(r == e.answer for r, e in zip(responses, examples, strict=True)) / max(1, len(examples))
    model.train(was_training)
    return acc
