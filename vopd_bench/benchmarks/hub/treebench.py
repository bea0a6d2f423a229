"""TreeBench (`HaochenWang/TreeBench`): 405 lettered questions on SA-1B photos with traceable evidence.

Layout: `TreeBench.tsv` with `index`, `image` (base64), `question`, options in columns `A`…`E`, `answer` (a
letter), `category` ("Perception/OCR") and `target_instances`: a Python list literal of [x1, y1, x2, y2] boxes in
image pixels. It is read with `ast.literal_eval` (never `eval`). Several boxes make a union crop; an empty list
leaves the question with the full view only.

TreeBench is not in the paper. The default prompt is the paper's lettered-question prompt (the V* one);
`treebench@vlmeval` is VLMEvalKit's ("Question: …\\nOptions:\\nA. …\\nAnswer with the correct option's letter
directly.").
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from typing import Any

from vopd_bench.benchmarks.hub.common import (
    HubRepo,
    Prompt,
    adapted,
    hub_spec,
    no_arg,
    present,
    read_tsv,
    register_variants,
    repo_root,
)
from vopd_bench.benchmarks.spec import MCQ_PROMPT, BenchmarkSpec, LoadContext
from vopd_bench.errors import SampleError
from vopd_bench.samples import LETTERS

REPO = HubRepo("HaochenWang/TreeBench", markers=("TreeBench.tsv",), download=("TreeBench.tsv",))
PROMPTS = {
    "paper": Prompt(MCQ_PROMPT),
    "vlmeval": Prompt("Question: {question}\nOptions:\n{options}\nAnswer with the correct option's letter directly.",
                      option_format="{letter}. {text}"),
}
MAX_LITERAL = 100_000  # characters; far above any real box list, and bounds what literal_eval is given


def parse_instances(raw: Any) -> list:
    """`target_instances` as a list (empty when the cell is empty)."""
    if not present(raw):
        return []
    text = str(raw).strip()
    if len(text) > MAX_LITERAL:
        raise SampleError(f"target_instances is {len(text)} characters long")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise SampleError(f"target_instances {text[:60]!r} is not a list literal") from None
    if not isinstance(value, (list, tuple)):
        raise SampleError(f"target_instances {text[:60]!r} is not a list")
    return list(value)


def _adapt(row: dict[str, Any]) -> dict[str, Any]:
    options = []
    for letter in LETTERS[:5]:
        if not present(row.get(letter)):
            break
        options.append(str(row[letter]).strip())
    return {**row, "options": tuple(options), "bbox": parse_instances(row.get("target_instances"))}


def _build(name: str, prompt: Prompt, arg: str | None) -> BenchmarkSpec:
    no_arg(name, arg)

    def rows(ctx: LoadContext) -> Iterator[dict[str, Any]]:
        path = repo_root(REPO, ctx) / "TreeBench.tsv"
        yield from adapted(read_tsv(path, need=("index", "image", "question", "A", "answer")), _adapt)

    return hub_spec(name, prompt, source=REPO.source, load_rows=rows, answer_type="mcq", box_format="xyxy",
                    fields={"id": "index"}, evidence="boxes (a row may have none)")


register_variants("treebench", PROMPTS, _build)
