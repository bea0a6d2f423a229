"""ZoomBench (`inclusionAI/ZoomBench`): 845 fine-grained questions, lettered or open, each with a crop of its
evidence region.

Layout: `data/test*.parquet` with `id`, the question and answer, `image` and `crop_image` (HF Image structs;
`crop_image` may be null) and `question_type` ("mcq" for lettered questions; an unknown value is decided by the
question: clean "(A) …" option lines and a one-letter answer make it lettered). Two field schemas circulate: the
released parquet names the text fields `query`/`response`, the dataset card and the ZwZ code `prompt`/`answer`;
both are read.

Evidence. The crop view is the shipped `crop_image` (ZwZ's `zoom-bench-crop`: same question, the crop as the
image). The box view, `gap_locate`/`gap_zoom` and the gap by evidence size need a box: a `bbox` column
([x1, y1, x2, y2] in original pixels) when a copy has one (`box_source: dataset`), else the box is recovered by
locating the crop in the image (`box_recovery`, normalised cross-correlation over scales; `box_source:
recovered`, with `box_score`). A match under the threshold is refused (`box_source: none`, `box_score`, and
`box_note` with the reason): that question keeps its full and crop views. Recovery decodes both images of each
row and matches them at several scales while the benchmark loads, so loading takes longer than reading rows.

The prompt is the query as written (Appendix B: `{question}\\n{options}`), whose
lettered questions already end in " Select from the following choices.\\n(A) …".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from vopd_bench.benchmarks.box_recovery import recover_box
from vopd_bench.benchmarks.hub.common import (
    HubRepo,
    ParquetImages,
    Prompt,
    adapted,
    files,
    hub_spec,
    letter_answer,
    no_arg,
    open_answer_type,
    parquet_rows,
    present,
    register_variants,
    repo_root,
    split_option_lines,
    strip_image_token,
)
from vopd_bench.benchmarks.spec import BenchmarkSpec, LoadContext
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.images import load_image
from vopd_bench.samples import LETTERS

REPO = HubRepo("inclusionAI/ZoomBench", markers=("data/test*.parquet",), download=("data/test*.parquet",))
PROMPTS = {"paper": Prompt("{question}\n{options}", open_prompt="{question}")}
TEXT_FIELDS = (("query", "response"), ("prompt", "answer"))  # released parquet, then the card's schema
# question_type values, compared with case, spaces, "-" and "_" removed. Any other value (or none) is decided
# by the question itself: clean "(A) …" option lines and a one-letter answer make it lettered.
MCQ_TYPES = {"mcq", "multiplechoice", "multiplechoicequestion", "choice", "mc"}
OPEN_TYPES = {"oq", "open", "openended", "openquestion", "freeform", "shortanswer", "vqa"}
CATEGORY_FIELDS = ("category", "dimension", "question_type")


def _text_fields(row: dict[str, Any]) -> tuple[Any, Any]:
    for q, a in TEXT_FIELDS:
        if present(row.get(q)):
            return row.get(q), row.get(a)
    raise SampleError("no question: neither 'query' nor 'prompt' is set")


def _adapt(row: dict[str, Any]) -> dict[str, Any]:
    query, answer = _text_fields(row)
    query = strip_image_token(str(query))
    if not present(answer):
        raise SampleError("no answer: neither 'response' nor 'answer' is set")
    qtype = re.sub(r"[\s_-]+", "", str(row.get("question_type") or "")).lower()
    question, options, tail = split_option_lines(query)
    if qtype in MCQ_TYPES or qtype in OPEN_TYPES:
        lettered = qtype in MCQ_TYPES
    else:
        lettered = bool(options) and len(letter_answer(answer)) == 1 and letter_answer(answer) in LETTERS[:len(options)]
    if lettered:
        if not options or tail.strip():
            # Options that are not clean "(A) …" lines to the end stay in the question, as written.
            question, options = query, ()
        out = {"question": question, "options": options, "answer": letter_answer(answer), "answer_type": "mcq"}
    else:
        out = {"question": query, "options": (), "answer": str(answer).strip(), "answer_type": open_answer_type(answer)}
    category = next((row[f] for f in CATEGORY_FIELDS if present(row.get(f))), None)
    return {**row, **out, "category": category, **_evidence(row)}


def _evidence(row: dict[str, Any]) -> dict[str, Any]:
    """The evidence box and where it came from: the row's `bbox`, or one recovered from its crop."""
    bbox = row.get("bbox")
    if bbox is not None and (not hasattr(bbox, "__len__") or len(bbox)):
        return {"bbox": bbox, "box_source": "dataset"}
    if row.get("crop_image") is None or row.get("image") is None:
        return {"bbox": None}
    try:
        found = recover_box(load_image(row["image"]), load_image(row["crop_image"]))
    except SampleError as e:  # the views report the unreadable image; the box is simply not recovered
        return {"bbox": None, "box_source": "none", "box_note": str(e)}
    if found.box is None:
        return {"bbox": None, "box_source": "none", "box_score": _finite(found.score), "box_note": found.reason}
    return {"bbox": list(found.box), "box_source": "recovered", "box_score": found.score}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _build(name: str, prompt: Prompt, arg: str | None) -> BenchmarkSpec:
    no_arg(name, arg)

    def rows(ctx: LoadContext) -> Iterator[dict[str, Any]]:
        paths = files(repo_root(REPO, ctx), "data/test*.parquet")
        for path in paths:
            # One schema check per file, before any row: a copy of another dataset should stop the run.
            cols = set(ParquetImages(path).columns)
            if not any({q, a} <= cols for q, a in TEXT_FIELDS):
                raise VopdError(f"{path} has neither the query/response nor the prompt/answer fields "
                                f"(columns: {', '.join(sorted(cols))})")
        yield from adapted(parquet_rows(paths, lazy=("image", "crop_image"), nullable=("crop_image",)), _adapt)

    return hub_spec(name, prompt, source=REPO.source, load_rows=rows, box_format="xyxy", fields={"id": "id"},
                    evidence="crop images; boxes given or recovered from them",
                    meta_fields=("box_source", "box_score", "box_note"))


register_variants("zoombench", PROMPTS, _build)
