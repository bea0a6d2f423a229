"""The cost of refusing an over-long prompt before generation, against the cost of tokenising it in full.

    .venv/bin/python benchmarks/prompt_length.py

A question of about 80k tokens (the issue's 260 KB case, doubled) with a 224x224 image, and the toy's processor
(context 4,096). It times `PromptLength.check` (which refuses it), a full tokenisation of the same chat text, and
the check on an ordinary short question, and prints the process's peak RSS growth across the check.
"""

from __future__ import annotations

import resource
import time

from vopd_bench.context import PromptLength
from vopd_bench.errors import SampleError
from vopd_bench.modeling import TOY_DIR, chat_text


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(TOY_DIR)
    lengths = PromptLength(processor, 4096)
    huge = "What colour is the shape? " + " ".join(f"word{i} lorem ipsum" for i in range(40000))
    short = "What colour is the triangle?\n(A) red\n(B) green\n(C) blue"

    def refuse() -> None:
        try:
            lengths.check(huge, [(224, 224)], max_new_tokens=32)
        except SampleError:
            return
        raise AssertionError("the huge prompt was not refused")

    lengths.check(short, [(224, 224)], max_new_tokens=32)  # warm the caches
    before = peak_rss_mb()
    t_refuse = best_of(5, refuse)
    grew = peak_rss_mb() - before
    n_tokens = len(processor.tokenizer(chat_text(processor, huge))["input_ids"])
    t_full = best_of(3, lambda: processor.tokenizer(chat_text(processor, huge)))
    t_short = best_of(200, lambda: lengths.check(short, [(224, 224)], max_new_tokens=32))
    print(f"huge question: {len(huge):,} characters, {n_tokens:,} tokens; context 4,096")
    print(f"check (refuses it)      : {1e3 * t_refuse:8.1f} ms   peak RSS growth {grew:.0f} MB")
    print(f"full tokenisation       : {1e3 * t_full:8.1f} ms   ratio {t_full / t_refuse:.1f}x the check")
    print(f"check of a short prompt : {1e6 * t_short:8.1f} µs")


if __name__ == "__main__":
    main()
