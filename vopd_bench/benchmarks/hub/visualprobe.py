"""VisualProbe (Mini-o3): free-form questions about small targets among many distractors, in three difficulty
levels, each its own repository (`Mini-o3/VisualProbe_Easy`, `_Medium`, `_Hard`). Full view only.

Layout of each: `val.json`, a list of {"images": [path], "problem": text with `<image>`, "solution": text}; the
image paths start with the repository's folder name (`VisualProbe_Easy/…`), so they resolve against the copy
with that prefix removed, or against the folder above it.

`visualprobe` loads all three levels (from `DIR/VisualProbe_Easy` … or the hub) and its headline score is the
mean of the three level accuracies (Vision-OPD's convention); `visualprobe:easy` (medium, hard) loads one level,
and then DIR may also be that level's copy itself. The prompt is the problem as written (the paper gives none).
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
    open_answer_type,
    present,
    register_variants,
    repo_root,
    strip_image_token,
)
from vopd_bench.benchmarks.metrics import visualprobe_metrics
from vopd_bench.benchmarks.spec import ROW_ERROR, BenchmarkSpec, LoadContext
from vopd_bench.errors import SampleError, VopdError

LEVELS = ("easy", "medium", "hard")
PROMPTS = {"paper": Prompt("{question}\n{options}", open_prompt="{question}")}


def level_repo(level: str) -> HubRepo:
    return HubRepo(f"Mini-o3/VisualProbe_{level.capitalize()}", markers=("val.json",))


def _resolve_image(root: Path, rel: str) -> str:
    parts = Path(rel).parts
    candidates = [root.parent / rel, root / rel]
    if len(parts) > 1:
        candidates.insert(0, root / Path(*parts[1:]))
    return str(next((c for c in candidates if c.is_file()), candidates[0]))


def _read_level(root: Path, level: str) -> Iterator[dict[str, Any]]:
    path = root / "val.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VopdError(f"{path}: cannot read as JSON ({e})") from None
    if not isinstance(data, list):
        raise VopdError(f"{path}: expected a JSON list of questions")
    for i, row in enumerate(data):
        sid = f"{level}-{row.get('id', i) if isinstance(row, dict) else i}"
        if not isinstance(row, dict):
            yield {"id": sid, ROW_ERROR: f"entry {i} of val.json is not an object"}
            continue
        yield {**row, "id": sid, "level": level, "_root": root}


def _adapt(row: dict[str, Any]) -> dict[str, Any]:
    images = row.get("images")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images or not isinstance(images[0], str):
        raise SampleError("missing field 'images'")
    if not present(row.get("problem")):
        raise SampleError("missing field 'problem'")
    answer = row.get("solution")
    if not present(answer):
        raise SampleError("missing field 'solution'")
    return {**row, "image": _resolve_image(row.pop("_root"), images[0]), "question": strip_image_token(row["problem"]),
            "answer": str(answer).strip(), "answer_type": open_answer_type(answer)}


def _build(name: str, prompt: Prompt, arg: str | None) -> BenchmarkSpec:
    levels = LEVELS if not arg else (arg.strip().lower(),)
    if levels[0] not in LEVELS:
        raise VopdError(f"unknown VisualProbe level {arg!r}; expected one of {', '.join(LEVELS)}")
    full_name = name if not arg else f"{name}:{levels[0]}"

    def rows(ctx: LoadContext) -> Iterator[dict[str, Any]]:
        for level in levels:
            root = repo_root(level_repo(level), _level_ctx(ctx, level, single=len(levels) == 1))
            yield from adapted(_read_level(root, level), _adapt)

    source = ", ".join(level_repo(lv).source for lv in levels)
    return hub_spec(full_name, prompt, source=source, load_rows=rows,
                    fields={"category": "level"}, meta_fields=("level",), metrics=visualprobe_metrics)


def _level_ctx(ctx: LoadContext, level: str, single: bool) -> LoadContext:
    """With all three levels, DIR must hold one copy per level (it cannot be all three at once)."""
    if ctx.data_dir is None or single:
        return ctx
    base = Path(ctx.data_dir).expanduser()
    repo = level_repo(level)
    owner, _, folder = repo.repo_id.partition("/")
    for cand in (base / owner / folder, base / folder):
        if cand.is_dir():
            return LoadContext(arg=ctx.arg, data_dir=str(cand), limit=ctx.limit, seed=ctx.seed)
    raise VopdError(f"no copy of {repo.repo_id} under {base}: expected {base / folder} (all three levels are "
                    f"needed; name one, e.g. visualprobe:{level}, to load only that level)")


register_variants("visualprobe", PROMPTS, _build)
