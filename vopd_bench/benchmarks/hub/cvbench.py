"""CV-Bench (`nyu-visionx/CV-Bench`, Cambrian-1): 2,638 lettered questions, 2D (Count, Relation; ADE20K and
COCO images) and 3D (Depth, Distance; Omni3D). Full view only: the 3D rows' `bbox` marks the objects compared
(already drawn in the image), not evidence, so it is not read.

Layout: `test_2d.parquet` and `test_3d.parquet` with `idx`, `type` (2D/3D), `task`, `image` (HF Image struct),
`question`, `choices` (list), `answer` ("(A)"), `prompt` (question + choices), `source` (ADE20K/COCO/Omni3D).
Metrics: the official score ½·((ADE20K + COCO)/2 + Omni3D) and the paper's (2D + 3D)/2.

The question sent is the shipped `prompt`, as written, as every harness (the authors', lmms-eval, VLMEvalKit)
sends it; `question` is then not needed. A copy without `prompt` gets it rebuilt the same way:
"{question} Select from the following choices.\n(A) …". `choices` is still read: its length gives the letters
a response may name.

`cv-bench@lmms` is lmms-eval's prompt: "Note: You only need to respond with A, B, … without providing any
additional information.\\n\\n" + the paper's prompt (the blank line is lmms-eval's).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from vopd_bench.benchmarks.hub.common import (
    HubRepo,
    ParquetImages,
    Prompt,
    adapted,
    files,
    hub_spec,
    no_arg,
    parquet_rows,
    present,
    register_variants,
    repo_root,
    require_any,
)
from vopd_bench.benchmarks.metrics import cvbench_metrics
from vopd_bench.benchmarks.spec import BenchmarkSpec, LoadContext
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.samples import LETTERS

FILES = ("test_2d.parquet", "test_3d.parquet")
REPO = HubRepo("nyu-visionx/CV-Bench", markers=("test_*d.parquet",), download=FILES)
REBUILT = "{question} Select from the following choices.\n{options}"  # what the shipped `prompt` holds
PROMPTS = {
    "paper": Prompt("{question}"),
    "lmms": Prompt("Note: You only need to respond with {letters} without providing any additional information.\n\n"
                   "{question}"),
}


def _adapt(row: dict[str, Any]) -> dict[str, Any]:
    choices = row.get("choices")
    choices = list(choices.tolist() if hasattr(choices, "tolist") else choices or [])
    if not choices:
        raise SampleError("no 'choices'")
    if present(row.get("prompt")):
        text = str(row["prompt"]).strip()
    elif present(row.get("question")):
        options = "\n".join(f"({LETTERS[i]}) {str(c).strip()}" for i, c in enumerate(choices))
        text = REBUILT.format(question=str(row["question"]).strip(), options=options)
    else:
        raise SampleError("neither 'prompt' nor 'question' is set")
    # `idx` may restart in each file, so the id carries the type.
    return {**row, "id": f"{row.get('type')}-{row.get('idx')}", "question": text, "bbox": None}


def _build(name: str, prompt: Prompt, arg: str | None) -> BenchmarkSpec:
    no_arg(name, arg)

    def rows(ctx: LoadContext) -> Iterator[dict[str, Any]]:
        root = repo_root(REPO, ctx)
        paths = [p for f in FILES for p in files(root, f)]
        if not paths:
            raise VopdError(f"{root} holds neither {' nor '.join(FILES)}")
        need = ("idx", "choices", "answer", "type", "source")
        for path in paths:  # one check per file, before any row
            require_any(path, ParquetImages(path).columns, ("prompt", "question"))
        yield from adapted(parquet_rows(paths, lazy=("image",), need=need), _adapt)

    return hub_spec(name, prompt, source=REPO.source, load_rows=rows, answer_type="mcq",
                    fields={"options": "choices", "category": "task"},
                    meta_fields=("type", "source", "task"), metrics=cvbench_metrics)


register_variants("cv-bench", PROMPTS, _build)
