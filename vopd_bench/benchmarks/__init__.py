"""The benchmark registry. A benchmark is named on the command line as `name` or `name:arg`
(`synthetic:test`, `local:data/my.jsonl`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vopd_bench.benchmarks.spec import BenchmarkSpec, LoadContext, row_to_sample
from vopd_bench.errors import VopdError
from vopd_bench.images import image_path
from vopd_bench.samples import BadSample, Sample

# name -> factory(arg) -> spec. Factories are cheap: nothing is read until `load`.
_REGISTRY: dict[str, Callable[[str | None], BenchmarkSpec]] = {}


def register(name: str) -> Callable:
    def deco(factory: Callable[[str | None], BenchmarkSpec]) -> Callable:
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class LoadedBenchmark:
    spec: BenchmarkSpec
    samples: list[Sample | BadSample]

    @property
    def name(self) -> str:
        return self.spec.name


def resolve(name: str) -> tuple[BenchmarkSpec, str | None]:
    _import_builtins()
    base, _, arg = name.partition(":")
    base = base.strip().lower()
    if base not in _REGISTRY:
        raise VopdError(f"unknown benchmark {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[base](arg or None), (arg or None)


def load(name: str, *, data_dir: str | None = None, limit: int | None = None, seed: int = 0) -> LoadedBenchmark:
    """Resolve `name` and read its samples. Bad rows come back as BadSample; a missing source, or one with no
    usable row at all, raises VopdError (a typo'd or truncated file must not look like a finished run)."""
    spec, arg = resolve(name)
    ctx = LoadContext(arg=arg, data_dir=data_dir, limit=limit, seed=seed)
    samples: list[Sample | BadSample] = []
    seen: set[str] = set()
    for i, row in enumerate(spec.load_rows(ctx)):
        if limit is not None and len(samples) >= limit:
            break
        s = row_to_sample(row, spec, i)
        if s.id in seen:  # duplicate ids would silently merge records; keep both, visibly renamed
            s = _renamed(s, f"{s.id}#{i}")
        seen.add(s.id)
        samples.append(s)
    if limit != 0:
        check_usable(spec, samples)
    return LoadedBenchmark(spec, samples)


def check_usable(spec: BenchmarkSpec, samples: list[Sample | BadSample]) -> None:
    """At least one row must be a Sample; otherwise the run stops with one line naming the source."""
    if not samples:
        raise VopdError(f"{spec.source}: no rows to evaluate in {spec.name}")
    if all(isinstance(s, BadSample) for s in samples):
        first = samples[0]
        raise VopdError(f"{spec.source}: none of its {len(samples)} row(s) is usable "
                        f"(first, {first.id}: {_one_line(first.error)})")
    # Image files are read later, one sample at a time; but when not one of them exists (a wrong folder, a
    # relative path from elsewhere), every sample would fail alike: say so now, once.
    paths = [image_path(s.image) for s in samples if isinstance(s, Sample)]
    if paths and all(p is not None for p in paths) and not any(p.is_file() for p in paths):
        raise VopdError(f"{spec.source}: none of its {len(paths)} image file(s) exists (first: {paths[0]})")


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _renamed(s: Sample | BadSample, new_id: str) -> Sample | BadSample:
    from dataclasses import replace

    return replace(s, id=new_id)


def _import_builtins() -> None:
    # Each module registers its benchmarks on import.
    from vopd_bench.benchmarks import (  # noqa: F401
        hub,  # noqa: F401
        local,
        synthetic,
    )


__all__ = ["BenchmarkSpec", "LoadContext", "LoadedBenchmark", "available", "load", "register", "resolve"]
