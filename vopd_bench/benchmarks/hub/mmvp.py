"""MMVP (`MMVP/MMVP`, "Eyes Wide Shut"): 300 two-option questions in 150 CLIP-blind pairs (Index 1-2, 3-4, …).
Full view only.

Layout: `Questions.csv` (Index, Question, Options = "(a) Open (b) Closed", Correct Answer = "(a)") and
`MMVP Images/{Index}.jpg`. The paper's prompt is "{question} {options}" with the options as written, so the
letters stay lower-case; answers are scored by `mmvp_scorer`, which reads "(a)"/"(b)" as the authors' judge
does. Metrics: per question (acc_<view>) and per pair (acc_pair_<view>).

`mmvp@lmms` is lmms-eval's prompt ("{question}\\nA. …\\nB. …\\nAnswer with the option's letter from the given
choices directly."). lmms-eval also overrides four reference answers (its issue #1018); vopd keeps the dataset's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vopd_bench.benchmarks.hub.common import (
    HubRepo,
    Prompt,
    adapted,
    hub_spec,
    letter_answer,
    no_arg,
    present,
    register_variants,
    repo_root,
    require_columns,
)
from vopd_bench.benchmarks.local import read_table
from vopd_bench.benchmarks.metrics import mmvp_metrics
from vopd_bench.benchmarks.spec import BenchmarkSpec, LoadContext
from vopd_bench.errors import SampleError
from vopd_bench.samples import LETTERS, Sample
from vopd_bench.scoring import extract_letter

REPO = HubRepo("MMVP/MMVP", markers=("Questions.csv",))
IMAGE_DIR = "MMVP Images"
PROMPTS = {
    "paper": Prompt("{question} {options}", option_format="({lower}) {text}", option_sep=" "),
    "lmms": Prompt("{question}\n{options}\nAnswer with the option's letter from the given choices directly.",
                   option_format="{letter}. {text}"),
}
_LABEL = re.compile(r"\(([a-z])\)\s*")


def parse_inline_options(text: str) -> tuple[str, ...]:
    """"(a) Open (b) Closed" -> ("Open", "Closed"); labels must run (a), (b), … from the start."""
    text = text.strip()
    marks = list(_LABEL.finditer(text))
    if not marks or marks[0].start() != 0:
        raise SampleError(f"options {text[:40]!r} do not start with (a)")
    out = []
    for i, m in enumerate(marks):
        if m.group(1) != LETTERS[i].lower():
            raise SampleError(f"options {text[:40]!r} are not labelled (a), (b), … in order")
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out.append(text[m.end():end].strip())
    return tuple(out)


_BRACKETED = re.compile(r"[\(\[]([A-Za-z])[\)\]]")


def mmvp_scorer(sample: Sample, response: str) -> tuple[str | None, bool]:
    """The option a response picks: a bracketed letter in either case ("(a) Open", "(B)") when it names
    exactly one, else the general letter and option-text rules. None when it picks none or several."""
    valid = LETTERS[: len(sample.options)]
    said = {m.group(1).upper() for m in _BRACKETED.finditer(response or "")} & set(valid)
    if len(said) == 1:
        parsed = said.pop()
    elif said:
        parsed = None
    else:
        parsed = extract_letter(response, len(sample.options), sample.options)
    return parsed, parsed is not None and parsed == sample.answer


def _adapt(root: Path, row: dict[str, Any]) -> dict[str, Any]:
    index = row.get("Index")
    if not present(index):
        raise SampleError("missing field 'Index'")
    index = str(index).strip()
    if not present(row.get("Options")):
        raise SampleError("missing field 'Options'")
    return {**row, "Index": index, "image": str(root / IMAGE_DIR / f"{index}.jpg"),
            "options": parse_inline_options(str(row["Options"])), "answer": letter_answer(row.get("Correct Answer", ""))}


def _build(name: str, prompt: Prompt, arg: str | None) -> BenchmarkSpec:
    no_arg(name, arg)

    def rows(ctx: LoadContext) -> Iterator[dict[str, Any]]:
        root = repo_root(REPO, ctx)
        table = read_table(root / "Questions.csv")
        require_columns(root / "Questions.csv", table[0] if table else (), ("Index", "Question", "Options",
                                                                            "Correct Answer"))
        yield from adapted(table, lambda r: _adapt(root, r))

    return hub_spec(name, prompt, source=REPO.source, load_rows=rows, answer_type="mcq", scorer=mmvp_scorer,
                    fields={"id": "Index", "question": "Question"}, meta_fields=("Index",), metrics=mmvp_metrics)


register_variants("mmvp", PROMPTS, _build)
