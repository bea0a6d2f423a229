"""V* Bench (`craigwu/vstar_bench`): 191 lettered questions on high-resolution SA-1B photos.

Layout: `test_questions.jsonl` (image, text, label, category, question_id) and, next to each image, a JSON file
of the same stem holding the evidence: `{"target_object": [...], "bbox": [[x, y, w, h], ...], ...}`, one box per
target object (two for relative_position). Boxes are xywh pixels of the original image.

A question whose annotation lists no box (or has no annotation file) keeps its full view and is counted in
`n_no_evidence`: `acc_full` must count every question to stay comparable with published full-image accuracy.
An annotation file that exists but is not valid JSON, or a box that is malformed, is a bad sample.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vopd_bench.benchmarks.hub.common import (
    HubRepo,
    Prompt,
    adapted,
    hub_spec,
    no_arg,
    register_variants,
    repo_root,
    split_option_lines,
)
from vopd_bench.benchmarks.local import read_table
from vopd_bench.benchmarks.spec import MCQ_PROMPT, BenchmarkSpec, LoadContext
from vopd_bench.errors import SampleError

REPO = HubRepo("craigwu/vstar_bench", markers=("test_questions.jsonl",))
INSTRUCTION = "Answer with the option's letter from the given choices directly."
PROMPTS = {
    "paper": Prompt(MCQ_PROMPT),  # "{question}\n{options}\n" + INSTRUCTION, options as "(A) text"
    "lmms": Prompt("{question}\n{options}\n" + INSTRUCTION, option_format="{letter}. {text}"),
}


def _adapt(root: Path, row: dict[str, Any]) -> dict[str, Any]:
    rel = row.get("image")
    text = row.get("text")
    if not isinstance(rel, str) or not rel:
        raise SampleError("missing field 'image'")
    if not isinstance(text, str) or not text.strip():
        raise SampleError("missing field 'text'")
    question, options, _instruction = split_option_lines(text.strip())
    if not options:
        raise SampleError("text has no (A)/(B) option lines")
    image = root / rel
    ann_path = image.with_suffix(".json")
    try:
        ann = json.loads(ann_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        ann = {}
    except (OSError, ValueError) as e:
        raise SampleError(f"annotation {ann_path.name} is not valid JSON: {e}") from None
    if not isinstance(ann, dict):
        raise SampleError(f"annotation {ann_path.name} is not a JSON object")
    return {**row, "image": str(image), "question": question, "options": options, "bbox": ann.get("bbox") or None}


def _build(name: str, prompt: Prompt, arg: str | None) -> BenchmarkSpec:
    no_arg(name, arg)

    def rows(ctx: LoadContext) -> Iterator[dict[str, Any]]:
        root = repo_root(REPO, ctx)
        yield from adapted(read_table(root / "test_questions.jsonl"), lambda r: _adapt(root, r))

    return hub_spec(name, prompt, source=REPO.source, load_rows=rows, answer_type="mcq", box_format="xywh",
                    fields={"id": "question_id", "answer": "label"}, evidence="boxes")


register_variants("vstar", PROMPTS, _build)
