"""POPE (`lmms-lab/POPE`, config default, split test): 9,000 yes/no object-hallucination questions on 500
COCO images, 3,000 each from the adversarial, popular and random samplings. Full view only.

Layout: `data/test-*.parquet` with `id`, `question_id`, `question` ("Is there a … in the image?"), `answer`
(yes/no), `image_source`, `image` (HF Image struct), `category` (adversarial/popular/random). The id is
"{category}-{question_id}", since question ids repeat across the three samplings.

Metrics: accuracy (acc_<view>) and precision, recall, F1, `yes_ratio_pred` (share of "yes" predictions) and
`yes_ratio_gt` (share of "yes" ground truths), overall and per category. The two yes-ratios have distinct
names because the original POPE reports the first and lmms-eval and the Vision-OPD script the second under the
same name.

Unparsed answers. The three references disagree on an answer that says neither yes nor no: the original POPE
script reads it as "yes" (it keeps the first sentence and reads "no" only when a word is "No", "no" or "not"),
lmms-eval scores it wrong, and `pope` here counts it as a parse failure: wrong, and not a "yes" for precision
and recall. `pope@original` scores every answer with the original POPE rule instead, so its numbers (accuracy,
F1, `yes_ratio_pred`) are comparable with papers that used that script. Its records never mix with `pope`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from vopd_bench.benchmarks.hub.common import (
    VARIANT_SEP,
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
from vopd_bench.samples import Sample

PATTERN = "data/test-*.parquet"
REPO = HubRepo("lmms-lab/POPE", markers=(PATTERN,), download=(PATTERN,))
PROMPT = Prompt("{question}\n{options}", open_prompt=OPEN_PROMPT)
PROMPTS = {"paper": PROMPT, "original": PROMPT}  # one prompt; `original` differs in how answers are read
_NEGATIVE_WORDS = frozenset({"No", "no", "not"})


def original_pope_answer(response: str) -> str:
    """The original POPE script's reading: the first sentence, commas removed, split on spaces; "no" if any word
    is "No", "no" or "not", else "yes" (so an unparsed answer is a "yes")."""
    first = response.split(".", 1)[0].replace(",", "")
    return "no" if _NEGATIVE_WORDS & set(first.split(" ")) else "yes"


def original_pope_scorer(sample: Sample, response: str) -> tuple[str | None, bool]:
    parsed = original_pope_answer(response or "")
    return parsed, parsed == str(sample.answer).strip().lower()


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

    scorer = original_pope_scorer if name.endswith(f"{VARIANT_SEP}original") else None
    return hub_spec(name, prompt, source=REPO.source, load_rows=rows, answer_type="yesno", scorer=scorer,
                    meta_fields=("category",), metrics=pope_metrics)


register_variants("pope", PROMPTS, _build)
