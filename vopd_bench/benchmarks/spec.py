"""A benchmark is declarative data: where rows come from, how fields map, the box format, the prompt and the
scorer. Adding a benchmark means writing one `BenchmarkSpec` plus, at most, one scoring function."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vopd_bench.errors import SampleError
from vopd_bench.geometry import parse_boxes
from vopd_bench.samples import LETTERS, AnswerType, BadSample, Sample

ANSWER_TYPES = ("mcq", "yesno", "short", "number")

# The V* instruction (paper Appendix B), the default for lettered questions of our own benchmarks.
MCQ_PROMPT = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."
OPEN_PROMPT = "{question}\nAnswer the question using a single word or phrase."

# A loader that cannot parse a raw row yields {"id": ..., ROW_ERROR: reason}; it becomes a BadSample.
ROW_ERROR = "__row_error__"

# A scorer returns (parsed answer or None, correct). None parsed = parse failure = wrong.
Scorer = Callable[[Sample, str], tuple[str | None, bool]]
RowLoader = Callable[["LoadContext"], Iterable[Mapping[str, Any]]]


@dataclass(frozen=True)
class LoadContext:
    """What a loader gets: the argument after `name:`, a local copy of the data if any, and the limit."""

    arg: str | None = None
    data_dir: str | None = None
    limit: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    source: str  # where the data lives, for humans and run.json: "procedural", "hf:craigwu/vstar_bench", a path
    load_rows: RowLoader
    prompt: str = MCQ_PROMPT  # used when the sample has options
    open_prompt: str = OPEN_PROMPT  # used when it has none
    option_format: str = "({letter}) {text}"
    option_sep: str = "\n"
    # Canonical field -> column in the raw row. Canonical fields: id, image, question, options, answer,
    # answer_type, bbox, bbox_format, category, crop_image. Unmapped fields are looked up by their own name.
    fields: Mapping[str, str] = field(default_factory=dict)
    box_format: str = "xyxy"
    answer_type: AnswerType | None = None  # None: "mcq" when options exist, else "short"
    scorer: Scorer | None = None  # None: the rule-based scorer for the answer type
    # Extra per-benchmark metrics computed from this benchmark's records: records DataFrame -> summary rows.
    metrics: Callable[[Any], list[dict]] | None = None
    # Raw columns copied into each record's `meta`, for benchmark metrics (e.g. cycle_category, difficulty).
    meta_fields: tuple[str, ...] = ()
    to_sample: Callable[[Mapping[str, Any], BenchmarkSpec, int], Sample] | None = None
    # What marks the evidence, as `vopd benchmarks` lists it: "" when nothing does (full view only: the crop and
    # box views and the gaps need evidence), else how it comes (e.g. "boxes", "crop images; boxes recovered").
    evidence: str = ""
    # One sample by its id without loading the rest, for a benchmark that can (a procedural one rebuilds it):
    # (sample id, LoadContext) -> the Sample, or None when the benchmark has no such sample. Used to rebuild the
    # records of failures.jsonl; without it the whole benchmark is loaded and searched.
    find: Callable[[str, LoadContext], Sample | None] | None = None

    def render_prompt(self, question: str, options: tuple[str, ...]) -> str:
        if not options:
            return self.open_prompt.format(question=question)
        opts = self.option_sep.join(self.option_format.format(letter=LETTERS[i], text=t) for i, t in enumerate(options))
        return self.prompt.format(question=question, options=opts)


def row_to_sample(row: Mapping[str, Any], spec: BenchmarkSpec, index: int) -> Sample | BadSample:
    """Map one raw row to a Sample, or a BadSample carrying the reason. Never raises."""
    fid = _get(row, spec, "id")
    sample_id = str(fid) if fid is not None else str(index)
    if ROW_ERROR in row:
        return BadSample(sample_id, str(row[ROW_ERROR]), _str_or_none(_get(row, spec, "category")))
    try:
        if spec.to_sample is not None:
            return spec.to_sample(row, spec, index)
        return _generic_sample(row, spec, sample_id)
    except SampleError as e:
        return BadSample(sample_id, str(e), _str_or_none(_get(row, spec, "category")))


def _generic_sample(row: Mapping[str, Any], spec: BenchmarkSpec, sample_id: str) -> Sample:
    image = _get(row, spec, "image")
    question = _get(row, spec, "question")
    if image is None or (isinstance(image, str) and not image.strip()):
        raise SampleError("missing field 'image'")
    if not isinstance(question, str) or not question.strip():
        raise SampleError("missing field 'question'")
    options = _options(_get(row, spec, "options"))
    answer = _get(row, spec, "answer")
    answer = None if answer is None else str(answer).strip()
    answer = answer or None  # unlabelled rows are fine for distillation; gap-report records them as unscorable
    if options and answer is not None:
        answer = answer.strip("()").upper()
        if len(answer) != 1 or answer not in LETTERS[: len(options)]:
            raise SampleError(f"answer {answer!r} is not one of the option letters A-{LETTERS[len(options) - 1]}")
    fmt = _get(row, spec, "bbox_format") or spec.box_format
    boxes = parse_boxes(_maybe_json(_get(row, spec, "bbox")), str(fmt))
    answer_type = _get(row, spec, "answer_type") or spec.answer_type or ("mcq" if options else "short")
    if answer_type not in ANSWER_TYPES:
        raise SampleError(f"answer_type {answer_type!r} is not one of {', '.join(ANSWER_TYPES)}")
    meta = {k: _plain(row.get(k)) for k in spec.meta_fields if k in row}
    return Sample(
        id=sample_id, image=image, question=question.strip(), options=options, answer=answer,
        answer_type=answer_type, boxes=boxes, category=_str_or_none(_get(row, spec, "category")),
        metadata=meta, crop_image=_get(row, spec, "crop_image"),
    )


def _get(row: Mapping[str, Any], spec: BenchmarkSpec, canonical: str) -> Any:
    v = row.get(spec.fields.get(canonical, canonical))
    if isinstance(v, float) and v != v:  # pandas turns missing CSV cells into NaN
        return None
    return v


def _options(raw: Any) -> tuple[str, ...]:
    raw = _maybe_json(raw)
    if raw is None:
        return ()
    if hasattr(raw, "tolist"):
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise SampleError(f"options must be a list, got {type(raw).__name__}")
    if len(raw) > len(LETTERS):
        raise SampleError("more than 26 options")
    return tuple(str(o).strip() for o in raw)


def _maybe_json(v: Any) -> Any:
    """CSV cells hold lists as JSON text."""
    if isinstance(v, str) and v.strip()[:1] in "[{":
        import json

        try:
            return json.loads(v)
        except json.JSONDecodeError:
            raise SampleError(f"cannot parse {v[:60]!r} as a list") from None
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _str_or_none(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)


def _plain(v: Any) -> Any:
    return v.tolist() if hasattr(v, "tolist") else v
