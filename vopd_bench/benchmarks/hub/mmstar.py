"""MMStar (`Lin-Chen/MMStar`, split val): 1,500 four-option questions whose options are written into the
question ("…\\nOptions: A: x, B: y, C: z, D: w"). Full view only.

Layout: `mmstar.parquet` with `index`, `question`, `image`, `answer` (a letter), `category` (6 core
capabilities), `l2_category` (18) and `meta_info`. The options are read back out of the question so the scorer
knows them; the paper's prompt "{question}\\nOptions: {options}" then reproduces the question exactly. A
question whose options do not follow that layout is asked as written.

Metrics: lmms-eval's score, the mean over l2 categories, overall and per core category (acc_l2_mean_<view>).
`mmstar@lmms` adds lmms-eval's "\\nAnswer with the option's letter from the given choices directly" (no period).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from vopd_bench.benchmarks.hub.common import (
    HubRepo,
    Prompt,
    adapted,
    hub_spec,
    no_arg,
    parquet_rows,
    register_variants,
    repo_root,
)
from vopd_bench.benchmarks.metrics import mmstar_metrics
from vopd_bench.benchmarks.spec import BenchmarkSpec, LoadContext
from vopd_bench.samples import LETTERS

REPO = HubRepo("Lin-Chen/MMStar", markers=("mmstar.parquet",), download=("mmstar.parquet",))
MARK = "\nOptions: "
_LMMS = "\nAnswer with the option's letter from the given choices directly"
PROMPTS = {
    "paper": Prompt("{question}" + MARK + "{options}", option_format="{letter}: {text}", option_sep=", "),
    "lmms": Prompt("{question}" + MARK + "{options}" + _LMMS, open_prompt="{question}" + _LMMS,
                   option_format="{letter}: {text}", option_sep=", "),
}
_LABEL = re.compile(r"(?:^|, )([A-Z]): ")


def split_inline_options(question: str) -> tuple[str, tuple[str, ...]]:
    """"Q?\\nOptions: A: x, B: y" -> ("Q?", ("x", "y")); (question, ()) when the layout is anything else, or
    when re-rendering would not give back the same text."""
    at = question.rfind(MARK)
    if at < 0:
        return question, ()
    stem, listing = question[:at], question[at + len(MARK):]
    marks = list(_LABEL.finditer(listing))
    if not marks or marks[0].start() != 0 or [m.group(1) for m in marks] != list(LETTERS[: len(marks)]):
        return question, ()
    options = tuple(listing[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(listing)]
                    for i, m in enumerate(marks))
    if stem + MARK + ", ".join(f"{LETTERS[i]}: {o}" for i, o in enumerate(options)) != question:
        return question, ()
    return stem, options


def _adapt(row: dict[str, Any]) -> dict[str, Any]:
    question, options = split_inline_options(str(row.get("question") or "").strip())
    return {**row, "question": question, "options": options}


def _build(name: str, prompt: Prompt, arg: str | None) -> BenchmarkSpec:
    no_arg(name, arg)

    def rows(ctx: LoadContext) -> Iterator[dict[str, Any]]:
        path = repo_root(REPO, ctx) / "mmstar.parquet"
        yield from adapted(parquet_rows([path], lazy=("image",), need=("index", "question", "answer")), _adapt)

    return hub_spec(name, prompt, source=REPO.source, load_rows=rows, answer_type="mcq", fields={"id": "index"},
                    meta_fields=("category", "l2_category"), metrics=mmstar_metrics)


register_variants("mmstar", PROMPTS, _build)
