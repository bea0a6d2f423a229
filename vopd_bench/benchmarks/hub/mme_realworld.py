"""MME-RealWorld, English, Chinese and Lite (the lmms-eval parquet releases): five-option questions on large
real-world images (OCR in the wild, remote sensing, diagrams and tables, monitoring, autonomous driving).
Full view only.

Layout: `data/*.parquet` (split `train`) with `index`, `question`, `multi-choice options` (a list of
"(A) text" strings), `answer` (a letter), `category` ("Perception/Monitoring": task/domain), `l2-category` (the
subtask) and `bytes` (the image as a base64 string; `image` is accepted too).

The paper's prompts (Appendix B) end in "The best answer is:" / "最佳答案为："; `@lmms` is lmms-eval's (and
the official) wording, which differs only in spacing: a trailing space, and in Chinese a space before "选项" and
around "或".
"""

from __future__ import annotations

import re
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
    register_variants,
    repo_root,
)
from vopd_bench.benchmarks.metrics import mme_realworld_metrics
from vopd_bench.benchmarks.spec import BenchmarkSpec, LoadContext
from vopd_bench.errors import SampleError
from vopd_bench.samples import LETTERS

_EN_TAIL = ("Select the best answer to the above multiple-choice question based on the image. Respond with only the "
            "letter (A, B, C, D, or E) of the correct option.\nThe best answer is:")
EN_PROMPTS = {
    "paper": Prompt("{question} The choices are listed below:\n{options}\n" + _EN_TAIL),
    "lmms": Prompt("{question} The choices are listed below:\n{options}\n" + _EN_TAIL + " "),
}
CN_PROMPTS = {
    "paper": Prompt("{question}选项如下所示:\n{options}\n根据图像选择上述多项选择题的最佳答案。只需回答正确选项的字母（A, B, C, D或E）。\n最佳答案为："),
    "lmms": Prompt("{question} 选项如下所示:\n{options}\n根据图像选择上述多项选择题的最佳答案。只需回答正确选项的字母（A, B, C, D 或 E）。\n最佳答案为： "),
}
VERSIONS = {
    "mme-realworld": ("yifanzhang114/MME-RealWorld-Lmms-eval", EN_PROMPTS),
    "mme-realworld-cn": ("yifanzhang114/MME-RealWorld-CN-Lmms-eval", CN_PROMPTS),
    "mme-realworld-lite": ("yifanzhang114/MME-RealWorld-lite-lmms-eval", EN_PROMPTS),
}
OPTIONS = "multi-choice options"
# Some CN rows label options with full-width brackets, "（A）"; lmms-eval reads them as "(A)", and so do we.
_LABELLED = re.compile(r"^[(（]\s*([A-Z])\s*[)）]\s?(.*)$", re.DOTALL)


def parse_labelled_options(raw: Any) -> tuple[str, ...]:
    """["(A) 13", "（B）14"] -> ("13", "14"); the labels must run A, B, … (half- or full-width brackets)."""
    if hasattr(raw, "tolist"):
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)) or not raw:
        raise SampleError(f"'{OPTIONS}' is not a list of options")
    out = []
    for i, item in enumerate(raw):
        m = _LABELLED.match(str(item).strip())
        if not m or m.group(1) != LETTERS[i]:
            raise SampleError(f"option {str(item)[:40]!r} is not labelled ({LETTERS[i]})")
        out.append(m.group(2).strip())
    return tuple(out)


def _adapt(row: dict[str, Any]) -> dict[str, Any]:
    image = row.get("bytes") if row.get("bytes") is not None else row.get("image")
    return {**row, "image": image, "options": parse_labelled_options(row.get(OPTIONS))}


def _family(base: str, repo_id: str, prompts: dict[str, Prompt]) -> None:
    repo = HubRepo(repo_id, markers=("data/*.parquet",), download=("data/*",))

    def build(name: str, prompt: Prompt, arg: str | None) -> BenchmarkSpec:
        no_arg(name, arg)

        def rows(ctx: LoadContext) -> Iterator[dict[str, Any]]:
            paths = files(repo_root(repo, ctx), "data/*.parquet")
            need = ("index", "question", OPTIONS, "answer")
            yield from adapted(parquet_rows(paths, lazy=("bytes", "image"), need=need), _adapt)

        return hub_spec(name, prompt, source=repo.source, load_rows=rows, answer_type="mcq",
                        fields={"id": "index"}, meta_fields=("category", "l2-category"),
                        metrics=mme_realworld_metrics)

    register_variants(base, prompts, build)


for _base, (_repo, _prompts) in VERSIONS.items():
    _family(_base, _repo, _prompts)
