"""V* Bench (`craigwu/vstar_bench`): 191 lettered questions on high-resolution SA-1B photos.

Layout: `test_questions.jsonl` (image, text, label, category, question_id) and, next to each image, a JSON file
of the same stem holding the evidence: `{"target_object": [...], "bbox": [[x, y, w, h], ...], ...}`, one box per
target object (two for relative_position). Boxes are xywh pixels of the original image.

A question whose annotation is missing or lists no box is a bad sample with that reason: V* is an evidence
benchmark and the gap needs the box.
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
        raise SampleError(f"no annotation file {rel.rsplit('.', 1)[0]}.json next to the image") from None
    except (OSError, ValueError) as e:
        raise SampleError(f"annotation {ann_path.name} is not valid JSON: {e}") from None
    bbox = ann.get("bbox") if isinstance(ann, dict) else None
    if not bbox:
        raise SampleError(f"annotation {ann_path.name} lists no evidence box")
    return {**row, "image": str(image), "question": question, "options": options, "bbox": bbox}


def _build(name: str, prompt: Prompt, arg: str | None) -> BenchmarkSpec:
    no_arg(name, arg)

    def rows(ctx: LoadContext) -> Iterator[dict[str, Any]]:
        root = repo_root(REPO, ctx)
        yield from adapted(read_table(root / "test_questions.jsonl"), lambda r: _adapt(root, r))

    return hub_spec(name, prompt, source=REPO.source, load_rows=rows, answer_type="mcq", box_format="xywh",
                    fields={"id": "question_id", "answer": "label"})


register_variants("vstar", PROMPTS, _build)
