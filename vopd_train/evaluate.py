"""Validation during training: a small, fixed, held-out gap-report on the model being trained, in place.

Every `--eval-every` steps the trainer asks the validation questions under the full and crop views (and the box
view where there are boxes) with greedy decoding, through the `hf` backend wrapped around the training model
itself: no reload and no second copy of the weights. The questions are the same at every evaluation (the first
`--eval-limit` samples of each benchmark), so the numbers of two steps are directly comparable.

Under torchrun the sharded model is evaluated in place too: each rank asks its share of the questions and the
answers are pooled (`Validator.evaluate`).

Views and prompts are built as gap-report builds them, with gap-report's default view settings (the same as the
final re-measure), so the curves predict `before_after.csv`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vopd_bench import distributed, views
from vopd_bench.backends import GenerationConfig, Request
from vopd_bench.backends.hf import HFBackend
from vopd_bench.benchmarks.spec import BenchmarkSpec
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.images import load_image
from vopd_bench.samples import Sample
from vopd_bench.scoring import score_with

EVAL_VIEWS = ("full", "crop", "box")


@dataclass(frozen=True)
class EvalResult:
    """Accuracies as fractions. Every metric is computed on the same n samples: those with a valid answer on
    both the full and the crop view (box: those of them that have boxes)."""

    acc_full: float
    acc_crop: float
    acc_box: float | None
    n: int
    n_left_out: int  # validation samples without a valid full and crop answer (unreadable, backend error)

    @property
    def gap(self) -> float:
        return self.acc_crop - self.acc_full

    @property
    def mean_full_crop(self) -> float:
        return (self.acc_full + self.acc_crop) / 2

    def metrics(self) -> dict[str, Any]:
        return {"acc_full": self.acc_full, "acc_crop": self.acc_crop, "acc_box": self.acc_box, "gap": self.gap,
                "mean_full_crop": self.mean_full_crop, "n": self.n, "n_left_out": self.n_left_out}


def summarise(outcomes: dict[str, dict[str, bool]], n_samples: int) -> EvalResult:
    """`outcomes[sample][view]` = right or wrong (a missing view was not asked or had no valid answer), over a
    validation set of `n_samples`."""
    paired = [o for o in outcomes.values() if "full" in o and "crop" in o]
    if not paired:
        raise VopdError("the validation set gave no sample with a valid answer on both the full and the crop view")
    boxed = [o for o in paired if "box" in o]
    return EvalResult(
        acc_full=sum(o["full"] for o in paired) / len(paired),
        acc_crop=sum(o["crop"] for o in paired) / len(paired),
        acc_box=sum(o["box"] for o in boxed) / len(boxed) if boxed else None,
        n=len(paired), n_left_out=n_samples - len(paired))


class Validator:
    """The validation questions of `benchmarks`, loaded once; `evaluate(model, processor)` asks them."""

    def __init__(self, benchmarks: list[str], *, limit: int | None, batch_size: int, max_new_tokens: int,
                 data_dir: str | None = None):
        from vopd_bench import benchmarks as registry

        self.sets: list[tuple[BenchmarkSpec, list[Sample]]] = []
        for name in benchmarks:
            loaded = registry.load(name, limit=limit, data_dir=data_dir)
            usable = [s for s in loaded.samples if isinstance(s, Sample) and s.has_evidence]
            if not usable:
                raise VopdError(f"validation benchmark {name!r} has no sample with evidence: full and crop need one")
            self.sets.append((loaded.spec, usable))
        self.batch_size = batch_size
        self.gen = GenerationConfig(max_new_tokens=max_new_tokens)
        self.names = [spec.name for spec, _ in self.sets]
        self.n_samples = sum(len(samples) for _, samples in self.sets)

    def evaluate(self, model: Any, processor: Any) -> EvalResult:
        """Greedy answers of `model` as it is now; leaves it in the train/eval mode it was in.

        Under torchrun (an FSDP-sharded model) every rank asks its share of the batches, dealt round-robin, so
        each batch is the one a single process would send; the ranks decode in step (every forward gathers the
        model's shards), a rank with one batch fewer runs one throw-away batch to keep in step, and the answers
        are pooled: every rank returns the same result, the one a single process would."""
        lockstep = distributed.active()
        backend = HFBackend.from_loaded(model, processor, name="training-model", batch_size=self.batch_size,
                                        lockstep=lockstep)
        items = list(self._requests())
        batches = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        rank, world = distributed.rank(), distributed.world_size()
        mine = batches[rank::world]
        rounds = distributed.all_reduce_max(len(mine), next(model.parameters()).device) if lockstep else len(mine)
        outcomes: dict[str, dict[str, bool]] = {}
        was_training = model.training
        model.eval()
        try:
            for k in range(rounds):
                if k < len(mine):
                    self._ask(backend, mine[k], outcomes)
                else:  # keep in step with the ranks that have one more batch; the answer is not used
                    backend.generate([batches[0][0][2]], self.gen)
        finally:
            model.train(was_training)
        if lockstep:
            pooled: dict[str, dict[str, bool]] = {}
            for part in distributed.all_gather_object(outcomes):
                for key, views in part.items():
                    pooled.setdefault(key, {}).update(views)
            outcomes = pooled
        return summarise(outcomes, self.n_samples)

    def _requests(self) -> Iterator[tuple[str, str, Request, Sample, BenchmarkSpec]]:
        """(sample key, view, request, sample, spec) per view; a sample whose image cannot be read is left out."""
        for spec, samples in self.sets:
            for s in samples:
                key = f"{spec.name}/{s.id}"
                try:
                    image = load_image(s.image)
                    boxes, _ = views.clamp_boxes(s.boxes, image.width, image.height)
                    crop = load_image(s.crop_image) if s.crop_image is not None else None
                except SampleError:
                    continue
                for view in EVAL_VIEWS:
                    if view == "box" and not boxes:
                        continue
                    r = views.render(view, image, s.question, boxes, provided_crop=crop)
                    yield key, view, Request(f"{key}/{view}", r.image, spec.render_prompt(r.question, s.options)), s, spec

    def _ask(self, backend: HFBackend, batch: list, outcomes: dict[str, dict[str, bool]]) -> None:
        if not batch:
            return
        responses = backend.generate([b[2] for b in batch], self.gen)
        for (key, view, _, sample, spec), resp in zip(batch, responses, strict=True):
            if resp.error is not None:
                continue
            try:
                outcomes.setdefault(key, {})[view] = score_with(spec.scorer, sample, resp.text).correct
            except SampleError:  # a reference answer that cannot be scored
                continue
