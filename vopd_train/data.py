"""Training prompts: (student image, teacher crop, text), from any of the three sources `vopd distill` takes.

- a gap-report `failures.jsonl` (the recoverable cases of an earlier run);
- a benchmark split with evidence boxes (`synthetic:train`, `local:PATH`, ...);
- a folder in the Vision-OPD-6K layout: `train.jsonl` with `images`, `teacher_images` and `problem`.

No answer field is ever read here: the trainer learns from the model's own crop view, not from labels.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vopd_bench import views
from vopd_bench.benchmarks.spec import BenchmarkSpec, LoadContext
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.geometry import parse_boxes
from vopd_bench.images import load_image
from vopd_bench.samples import BadSample, Sample
from vopd_bench.views import ViewConfig


@dataclass(frozen=True)
class Rendered:
    student_image: Image.Image
    teacher_image: Image.Image
    text: str  # the user text, identical for student and teacher


@dataclass(frozen=True)
class TrainPrompt:
    """One prompt, rendered on demand (images are decoded only when its batch comes up)."""

    id: str
    render: Callable[[], Rendered]


@dataclass
class PromptSet:
    prompts: list[TrainPrompt]
    skipped: list[dict]  # {"id", "reason"}: rows that cannot be trained on, recorded, never silently dropped
    kind: str  # "failures" | "benchmark" | "vopd6k"
    benchmarks: list[str]  # the benchmarks the prompts came from (for choosing the held-out re-measure)


def load_prompts(source: str, *, student_view: str = "full", view_config: ViewConfig = ViewConfig(),
                 limit: int | None = None, data_dir: str | None = None) -> PromptSet:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "train.jsonl").is_file():
            raise VopdError(f"{path}: a data folder must hold train.jsonl (the Vision-OPD-6K layout)")
        out = _vopd6k(path, limit)
    elif path.suffix == ".jsonl" and path.is_file():
        out = _failures(path, student_view, view_config, limit, data_dir)
    else:
        out = _benchmark(source, student_view, view_config, limit, data_dir)
    if not out.prompts:
        raise VopdError(f"{source}: no usable training prompts ({len(out.skipped)} skipped"
                        + (f"; first reason: {out.skipped[0]['reason']}" if out.skipped else "") + ")")
    return out


REPLAY_FILE = "both_right.jsonl"


def replay_source(data: str) -> Path:
    """The both-right cases gap-report writes next to the failures.jsonl that `data` names (`--replay`)."""
    path = Path(data).expanduser()
    if not (path.suffix == ".jsonl" and path.is_file()):
        raise VopdError("--replay needs --data to be a gap-report failures.jsonl, with its both_right.jsonl beside it")
    replay = path.with_name(REPLAY_FILE)
    if not replay.is_file():
        raise VopdError(f"--replay: {replay} not found; gap-report writes it next to failures.jsonl (rerun it "
                        "with the full and crop views)")
    return replay


def replay_count(batch_size: int, share: float) -> int:
    """Prompts per step drawn from the replay set: the share of the batch, at least 1, leaving at least 1 mined."""
    if share <= 0:
        return 0
    return min(batch_size - 1, max(1, round(batch_size * share)))


def sample_prompt(sample: Sample, spec: BenchmarkSpec, student_view: str, view_config: ViewConfig,
                  prompt_id: str, full_prompt: str | None = None) -> TrainPrompt:
    """A benchmark sample as a training prompt. The text is built exactly as gap-report builds it."""

    def render() -> Rendered:
        image = load_image(sample.image)
        boxes, _ = views.clamp_boxes(sample.boxes, image.width, image.height)
        student = views.render(student_view, image, sample.question, boxes, view_config)
        provided = load_image(sample.crop_image) if sample.crop_image is not None else None
        teacher = views.render("crop", image, sample.question, boxes, view_config, provided_crop=provided)
        text = full_prompt if (student_view == "full" and full_prompt) else spec.render_prompt(student.question,
                                                                                                 sample.options)
        return Rendered(student.image, teacher.image, text)

    return TrainPrompt(prompt_id, render)


def _benchmark(name: str, student_view: str, view_config: ViewConfig, limit: int | None,
               data_dir: str | None = None) -> PromptSet:
    from vopd_bench import benchmarks

    loaded = benchmarks.load(name, limit=limit, data_dir=data_dir)  # the benchmark's standard data; --seed is the trainer's
    prompts, skipped = [], []
    for s in loaded.samples:
        pid = f"{loaded.name}/{s.id}"
        if isinstance(s, BadSample):
            skipped.append({"id": pid, "reason": s.error})
        elif not s.has_evidence:
            skipped.append({"id": pid, "reason": "no evidence box: the teacher needs a crop"})
        else:
            prompts.append(sample_prompt(s, loaded.spec, student_view, view_config, pid))
    return PromptSet(prompts, skipped, "benchmark", [loaded.name])


def _read_jsonl(path: Path) -> list[tuple[int, dict | str]]:
    rows: list[tuple[int, dict | str]] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((n, row if isinstance(row, dict) else f"line {n} is not a JSON object"))
            except json.JSONDecodeError as e:
                rows.append((n, f"line {n} is not valid JSON: {e.msg}"))
    return rows


def _failures(path: Path, student_view: str, view_config: ViewConfig, limit: int | None,
              data_dir: str | None = None) -> PromptSet:
    """gap-report's hand-off. A record whose image lives only in memory (image None, e.g. a procedural
    benchmark) is rebuilt by loading its benchmark and matching the sample id."""
    from vopd_bench import benchmarks

    rows = _read_jsonl(path)
    if rows and isinstance(rows[0][1], dict) and not {"benchmark", "sample_id"} <= set(rows[0][1]):
        raise VopdError(f"{path}: not a gap-report failures.jsonl (records need benchmark and sample_id)")
    prompts, skipped, names = [], [], []
    loaded: dict[tuple[str, int], dict[str, Sample | BadSample]] = {}
    specs: dict[str, BenchmarkSpec] = {}
    for n, row in rows:
        if limit is not None and len(prompts) >= limit:
            break
        if isinstance(row, str):
            skipped.append({"id": f"line{n}", "reason": row})
            continue
        bench, sid = str(row.get("benchmark", "")), str(row.get("sample_id", ""))
        pid = f"{bench}/{sid}"
        try:
            if not bench or not sid:
                raise SampleError("record lacks benchmark or sample_id")
            if bench not in specs:
                specs[bench] = _spec_for(bench)
            if row.get("image"):
                sample = Sample(id=sid, image=str(row["image"]), question=str(row.get("question") or ""),
                                options=tuple(str(o) for o in row.get("options") or ()),
                                boxes=parse_boxes(row.get("boxes")))
                if not sample.question:
                    raise SampleError("record has no question")
            else:
                seed = int((row.get("meta") or {}).get("seed", 0) or 0)
                if specs[bench].find is not None:  # rebuilt alone (a procedural benchmark)
                    found = specs[bench].find(sid, LoadContext(arg=bench.partition(":")[2] or None,
                                                               data_dir=data_dir, seed=seed))
                else:
                    if (bench, seed) not in loaded:
                        lb = benchmarks.load(bench, seed=seed, data_dir=data_dir)
                        loaded[(bench, seed)] = {s.id: s for s in lb.samples}
                    found = loaded[(bench, seed)].get(sid)
                if found is None:
                    raise SampleError(f"sample {sid!r} not found in benchmark {bench!r}")
                if isinstance(found, BadSample):
                    raise SampleError(found.error)
                sample = found
            if not sample.has_evidence:
                raise SampleError("no evidence box: the teacher needs a crop")
        except (SampleError, VopdError) as e:
            skipped.append({"id": pid, "reason": str(e)})
            continue
        prompts.append(sample_prompt(sample, specs[bench], student_view, view_config, pid,
                                     full_prompt=row.get("prompt") or None))
        if bench not in names:
            names.append(bench)
    return PromptSet(prompts, skipped, "failures", names)


def _spec_for(benchmark: str) -> BenchmarkSpec:
    """The benchmark's own prompt template; a benchmark this install does not know falls back to the default."""
    from vopd_bench import benchmarks

    try:
        return benchmarks.resolve(benchmark)[0]
    except VopdError:
        return BenchmarkSpec(name=benchmark, source="failures.jsonl", load_rows=lambda ctx: iter(()))


def _vopd6k(folder: Path, limit: int | None) -> PromptSet:
    """`images[0]` is the student image as the dataset ships it (the authors' has the red box drawn),
    `teacher_images[0]` the crop, `problem` the text with an `<image>` placeholder that the chat template
    replaces (the image always comes first)."""
    prompts, skipped = [], []
    for n, row in _read_jsonl(folder / "train.jsonl"):
        if limit is not None and len(prompts) >= limit:
            break
        pid = f"vopd6k/{n}"
        try:
            if isinstance(row, str):
                raise SampleError(row)
            pid = f"vopd6k/{row.get('id', n)}"
            student, teacher, problem = row.get("images"), row.get("teacher_images"), row.get("problem")
            if not isinstance(problem, str) or not problem.strip():
                raise SampleError("missing field 'problem'")
            if not student or not teacher:
                raise SampleError("missing field 'images' or 'teacher_images'")
            student = student[0] if isinstance(student, list) else student
            teacher = teacher[0] if isinstance(teacher, list) else teacher
            if problem.count("<image>") > 1:
                raise SampleError("more than one <image> placeholder; one image per prompt is supported")
            text = problem.replace("<image>", "").strip()
        except SampleError as e:
            skipped.append({"id": pid, "reason": str(e)})
            continue
        prompts.append(TrainPrompt(pid, _six_k_render(_rel(folder, student), _rel(folder, teacher), text)))
    return PromptSet(prompts, skipped, "vopd6k", [])


def _rel(folder: Path, p: object) -> object:
    if isinstance(p, dict) and p.get("path"):
        p = p["path"]
    if isinstance(p, str) and not Path(p).is_absolute():
        return str(folder / p)
    return p


def _six_k_render(student: object, teacher: object, text: str) -> Callable[[], Rendered]:
    def render() -> Rendered:
        return Rendered(load_image(student), load_image(teacher), text)  # type: ignore[arg-type]

    return render


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """A seeded permutation of range(n) per epoch: the data position alone fixes every batch."""
    order = list(range(n))
    random.Random(f"vopd-distill/{seed}/{epoch}").shuffle(order)
    return tuple(order)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The prompts of step `step` (0-based): consecutive slices of the per-epoch permutations, wrapping."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, i = divmod(pos, n)
        order = epoch_order(n, seed, epoch)
        take = min(batch_size - len(out), n - i)
        out.extend(order[i:i + take])
        pos += take
    return out
