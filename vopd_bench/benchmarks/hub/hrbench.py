"""HR-Bench 4K and 8K (`DreamMr/HR-Bench`): 800 rows each, 200 four-option questions, each asked under four
`cycle_category` values (circular option orders). Full view only: the 4K crops were cut around annotated
objects, but the coordinates are not released.

Layout: `hr_bench_4k.parquet` / `hr_bench_8k.parquet` with `index`, `question`, `A`–`D`, `answer` (a letter),
`category` (single = FSP, cross = FCP), `cycle_category` and `image` (a base64 string).

`hrbench-*@lmms` is lmms-eval's prompt ("{question}\\nA. …\\nAnswer the option letter directly.").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from vopd_bench.benchmarks.hub.common import (
    HubRepo,
    Prompt,
    adapted,
    hub_spec,
    no_arg,
    parquet_rows,
    present,
    register_variants,
    repo_root,
)
from vopd_bench.benchmarks.metrics import hrbench_metrics
from vopd_bench.benchmarks.spec import BenchmarkSpec, LoadContext
from vopd_bench.samples import LETTERS

REPO_ID = "DreamMr/HR-Bench"
PROMPTS = {
    "paper": Prompt("{question} Select from the following choices.\n{options}"),
    "lmms": Prompt("{question}\n{options}\nAnswer the option letter directly.", option_format="{letter}. {text}"),
}


def _adapt(row: dict[str, Any]) -> dict[str, Any]:
    options = []
    for letter in LETTERS[:6]:
        if letter not in row or not present(row[letter]):
            break
        options.append(str(row[letter]).strip())
    return {**row, "options": tuple(options)}


def _family(size: str) -> None:
    filename = f"hr_bench_{size}.parquet"
    repo = HubRepo(REPO_ID, markers=(filename,), download=(filename,))

    def build(name: str, prompt: Prompt, arg: str | None) -> BenchmarkSpec:
        no_arg(name, arg)

        def rows(ctx: LoadContext) -> Iterator[dict[str, Any]]:
            path = repo_root(repo, ctx) / filename
            need = ("index", "question", "A", "B", "answer", "cycle_category", "image")
            yield from adapted(parquet_rows([path], lazy=("image",), need=need), _adapt)

        return hub_spec(name, prompt, source=f"{repo.source}/{filename}", load_rows=rows, answer_type="mcq",
                        fields={"id": "index"}, meta_fields=("category", "cycle_category"), metrics=hrbench_metrics)

    register_variants(f"hrbench-{size}", PROMPTS, build)


_family("4k")
_family("8k")
