"""POPE (`lmms-lab/POPE`, config default, split test): 9,000 yes/no object-hallucination questions on 500
COCO images, 3,000 each from the adversarial, popular and random samplings. Full view only.

Layout: `data/test-*.parquet` with `id`, `question_id`, `question` ("Is there a … in the image?"), `answer`
(yes/no), `image_source`, `image` (HF Image struct), `category` (adversarial/popular/random). The id is
"{category}-{question_id}", since question ids repeat across the three samplings.

Metrics: accuracy (acc_<view>) and precision, recall, F1 and the yes-ratio of the predictions, overall and per
category.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from vopd_bench.benchmarks.hub.common import (
    HubRepo,
    Prompt,
    adapted,
    files,
    hub_spec,
    no_arg,
    parquet_rows,
    present,
    register_variants,
    repo_root,
)
from vopd_bench.benchmarks.metrics import pope_metrics
from vopd_bench.benchmarks.spec import OPEN_PROMPT, BenchmarkSpec, LoadContext
from vopd_bench.errors import SampleError

PATTERN = "data/test-*.parquet"
REPO = HubRepo("lmms-lab/POPE", markers=(PATTERN,), download=(PATTERN,))
PROMPTS = {"paper": Prompt("{question}\n{options}", open_prompt=OPEN_PROMPT)}


def _adapt(row: dict[str, Any]) -> dict[str, Any]:
    answer = str(row.get("answer") or "").strip().lower()
    if answer not in ("yes", "no"):
        raise SampleError(f"answer {row.get('answer')!r} is not yes or no")
    qid = row.get("question_id") if present(row.get("question_id")) else row.get("id")
    sid = f"{row['category']}-{qid}" if present(row.get("category")) else str(qid)
    return {**row, "id": sid, "answer": answer, "options": ()}


def _build(name: str, prompt: Prompt, arg: str | None) -> BenchmarkSpec:
    no_arg(name, arg)

    def rows(ctx: LoadContext) -> Iterator[dict[str, Any]]:
        paths = files(repo_root(REPO, ctx), PATTERN)
        yield from adapted(parquet_rows(paths, lazy=("image",), need=("question", "answer")), _adapt)

    return hub_spec(name, prompt, source=REPO.source, load_rows=rows, answer_type="yesno",
                    meta_fields=("category",), metrics=pope_metrics)


register_variants("pope", PROMPTS, _build)
