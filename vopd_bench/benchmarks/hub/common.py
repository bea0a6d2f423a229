"""What the hub benchmarks share: finding a dataset repository (a local copy or the hub), reading its files
lazily, parsing lettered options, and the prompt variants.

Prompt variants. Every benchmark is registered under its plain name with the paper's Appendix B prompt, and
under `name@variant` for each other prompt convention it knows (`hrbench-4k@lmms`, `cv-bench@lmms`, …). The
variant is part of the benchmark name, so its records, keys and summary rows never mix with the default's.

Local copies. `--data-dir DIR` holds a copy of the dataset repository with the hub's files and layout. DIR may
be the copy itself, or a folder of copies named like the repository (`DIR/HR-Bench` or `DIR/DreamMr/HR-Bench`),
so one DIR can serve a run over several benchmarks.
"""

from __future__ import annotations

import bisect
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vopd_bench.benchmarks import register
from vopd_bench.benchmarks.spec import ROW_ERROR, BenchmarkSpec, LoadContext
from vopd_bench.errors import SampleError, VopdError
from vopd_bench.images import LazySource, load_image
from vopd_bench.samples import LETTERS

DEFAULT_VARIANT = "paper"
VARIANT_SEP = "@"

# ---------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class Prompt:
    """One prompt convention. `prompt` is used for lettered questions ({question}, {options}, {letters} = "A, B,
    C"), `open_prompt` for the rest ({question}). An option renders with `option_format` ({letter}, {lower} = the
    lower-case letter, {text}) and options are joined by `option_sep`."""

    prompt: str
    open_prompt: str = "{question}"
    option_format: str = "({letter}) {text}"
    option_sep: str = "\n"


@dataclass(frozen=True)
class HubSpec(BenchmarkSpec):
    """A BenchmarkSpec whose option format may also use {lower} and whose prompt may use {letters}
    (MMVP's "(a) … (b) …" and lmms-eval's "respond with A, B, C" need them)."""

    def render_prompt(self, question: str, options: tuple[str, ...]) -> str:
        if not options:
            return self.open_prompt.format(question=question)
        opts = self.option_sep.join(
            self.option_format.format(letter=LETTERS[i], lower=LETTERS[i].lower(), text=t)
            for i, t in enumerate(options)
        )
        return self.prompt.format(question=question, options=opts, letters=", ".join(LETTERS[: len(options)]))


def hub_spec(name: str, prompt: Prompt, **kwargs: Any) -> HubSpec:
    return HubSpec(name=name, prompt=prompt.prompt, open_prompt=prompt.open_prompt,
                   option_format=prompt.option_format, option_sep=prompt.option_sep, **kwargs)


def register_variants(name: str, prompts: Mapping[str, Prompt],
                      build: Callable[[str, Prompt, str | None], BenchmarkSpec]) -> None:
    """Register `name` with the paper's prompt and `name@variant` for every other convention in `prompts`."""
    for variant, prompt in prompts.items():
        full = name if variant == DEFAULT_VARIANT else f"{name}{VARIANT_SEP}{variant}"
        register(full)(lambda arg, full=full, prompt=prompt: build(full, prompt, arg))


def no_arg(name: str, arg: str | None) -> None:
    if arg:
        raise VopdError(f"benchmark {name} takes no argument (got {name}:{arg})")


# ---------------------------------------------------------------------------------------------------------------
# Where the files are


@dataclass(frozen=True)
class HubRepo:
    """A dataset repository on the hub. `markers` are glob patterns of the files a copy must have; `download`
    restricts what is fetched from the hub (None = the whole repository)."""

    repo_id: str
    markers: tuple[str, ...]
    download: tuple[str, ...] | None = None

    @property
    def source(self) -> str:
        return f"hf:{self.repo_id}"


def repo_root(repo: HubRepo, ctx: LoadContext) -> Path:
    """The folder holding a copy of `repo`: found under `ctx.data_dir`, else fetched from the hub."""
    if ctx.data_dir:
        base = Path(ctx.data_dir).expanduser()
        owner, _, name = repo.repo_id.partition("/")
        candidates = [base / owner / name, base / name, base]
        for cand in candidates:
            if has_files(cand, repo.markers):
                return cand
        raise VopdError(f"no copy of {repo.repo_id} under {base}: none of {', '.join(map(str, candidates))} "
                        f"holds {' and '.join(repo.markers)}")
    root = _download(repo)
    if not has_files(root, repo.markers):
        raise VopdError(f"the hub copy of {repo.repo_id} lacks {' and '.join(repo.markers)}; pass --data-dir "
                        "with a local copy")
    return root


def _download(repo: HubRepo) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo.repo_id, repo_type="dataset",
                                 allow_patterns=list(repo.download) if repo.download else None)
    except Exception as e:  # offline, unreachable, gated or missing: the remedy is the same
        raise VopdError(f"cannot reach the hub for {repo.repo_id} ({type(e).__name__}); pass --data-dir with a "
                        "local copy") from None
    return Path(path)


def has_files(root: Path, patterns: Iterable[str]) -> bool:
    return root.is_dir() and all(any(root.glob(p)) for p in patterns)


def files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file())


# ---------------------------------------------------------------------------------------------------------------
# Rows


def adapted(rows: Iterable[Mapping[str, Any]], adapt: Callable[[dict[str, Any]], dict[str, Any]]) -> Iterator[dict]:
    """Apply a benchmark's row adapter; a row it cannot read becomes a recorded bad row with the reason.

    Besides the adapters' own SampleErrors, a value of an unexpected type or shape (a list where text was
    expected, …) is also bad data, not a reason to stop a long run.
    """
    for raw in rows:
        row = dict(raw)
        if ROW_ERROR in row:
            yield row
            continue
        try:
            yield adapt(row)
        except SampleError as e:
            yield {**row, ROW_ERROR: str(e)}
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            yield {**row, ROW_ERROR: f"unreadable row ({type(e).__name__}: {e})"}


def require_columns(path: Path, have: Iterable[str], need: Iterable[str]) -> None:
    missing = sorted(set(need) - set(have))
    if missing:
        raise VopdError(f"{path} lacks column(s) {', '.join(missing)}: is it the right dataset file?")


def require_any(path: Path, have: Iterable[str], one_of: Sequence[str]) -> None:
    if not set(one_of) & set(have):
        raise VopdError(f"{path} has none of the column(s) {', '.join(one_of)}: is it the right dataset file?")


class LazyCell(LazySource):
    """One image cell of a parquet file, read only when the image is decoded: benchmark parquets hold gigabytes
    of images, and a run needs one at a time."""

    __slots__ = ("_file", "_index", "_column")

    def __init__(self, file: ParquetImages, index: int, column: str) -> None:
        self._file, self._index, self._column = file, index, column

    def raw(self) -> Any:
        return self._file.cell(self._index, self._column)

    def __call__(self) -> Image.Image:
        return load_image(self)

    def __repr__(self) -> str:
        return f"<{self._column} of row {self._index} in {self._file.path.name}>"


STREAM_BUFFER = 1 << 20  # bytes read at a time from a column chunk


class ParquetImages:
    """The image cells of one parquet file, streamed a row at a time. A file may hold all its rows in one row
    group (HR-Bench 8K: 2.8 GB of images), so neither a row group nor a column chunk is ever read whole: a
    buffered stream over each image column yields one row per batch. Samples are rendered in file order, so
    each column keeps one cursor moving forward; asking for an earlier row restarts its stream.

    Streaming goes page by page, and every Parquet reader reads and decompresses a data page whole. A file
    written with a few huge pages (pyarrow's writer checks the page size only every 1,024 values) costs about
    twice its largest page at once: see benchmarks/parquet_memory.py --one-page."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.path = path
        try:
            # buffer_size > 0 and no pre-buffering: column chunks are read piecewise, not loaded whole.
            self.file = pq.ParquetFile(path, buffer_size=STREAM_BUFFER, pre_buffer=False)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise VopdError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        meta = self.file.metadata
        self._starts = [0]  # first row index of each row group
        for g in range(meta.num_row_groups):
            self._starts.append(self._starts[-1] + meta.row_group(g).num_rows)
        self._cursors: dict[str, _Cursor] = {}
        self._lock = threading.Lock()

    @property
    def columns(self) -> list[str]:
        return self.file.schema_arrow.names

    def cell(self, index: int, column: str) -> Any:
        with self._lock:
            cur = self._cursors.get(column)
            if cur is None or index < cur.next_index:
                cur = self._cursors[column] = _Cursor(self, column, self._group_of(index))
            return cur.value_at(index)

    def stream(self, column: str, first_group: int = 0, batch_size: int = 1) -> Iterator[Any]:
        groups = list(range(first_group, self.file.metadata.num_row_groups))
        return self.file.iter_batches(batch_size=batch_size, row_groups=groups, columns=[column], use_threads=False)

    def _group_of(self, index: int) -> int:
        return max(0, bisect.bisect_right(self._starts, index) - 1)

    def rows(self, lazy: Sequence[str], nullable: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        """Every row with the `lazy` columns as LazyCells. A `nullable` lazy column is streamed once ahead (a
        batch of cells at a time) to tell missing cells (None) from present ones."""
        lazy = [c for c in lazy if c in self.columns]
        small = [c for c in self.columns if c not in lazy]
        present = {c: self._present(c) for c in nullable if c in lazy}
        index = 0
        for g in range(self.file.num_row_groups):
            meta = self.file.read_row_group(g, columns=small).to_pylist() if small else None
            for r in range(self.file.metadata.row_group(g).num_rows):
                row = meta[r] if meta is not None else {}
                for c in lazy:
                    row[c] = LazyCell(self, index, c) if c not in present or present[c][index] else None
                yield row
                index += 1

    def _present(self, column: str) -> list[bool]:
        out: list[bool] = []
        for batch in self.stream(column, batch_size=16):
            out += _present(batch.column(0))
        return out


class _Cursor:
    """A forward-only stream over one column, positioned at row `next_index`."""

    def __init__(self, file: ParquetImages, column: str, group: int) -> None:
        self._batches = file.stream(column, group)
        self.next_index = file._starts[group]

    def value_at(self, index: int) -> Any:
        while True:
            batch = next(self._batches, None)
            if batch is None:
                raise SampleError(f"row {index} is past the end of the file")
            first, self.next_index = self.next_index, self.next_index + batch.num_rows
            if index < self.next_index:
                return batch.column(0)[index - first].as_py()


def _present(col: Any) -> list[bool]:
    """Which cells of an image column hold an image: not null, and for an HF Image struct, bytes or a path."""
    import pyarrow as pa
    import pyarrow.compute as pc

    valid = pc.is_valid(col)
    if pa.types.is_struct(col.type):
        parts = [pc.is_valid(pc.struct_field(col, f.name)) for f in col.type if f.name in ("bytes", "path")]
        if parts:
            some = parts[0] if len(parts) == 1 else pc.or_(parts[0], parts[1])
            valid = pc.and_(valid, some)
    return valid.to_pylist()


def parquet_rows(paths: Sequence[Path], lazy: Sequence[str], need: Sequence[str] = (),
                 nullable: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """Rows of parquet files; `lazy` are the image columns (at least one must exist), `need` the columns the
    benchmark cannot do without."""
    for path in paths:
        reader = ParquetImages(path)
        require_columns(path, reader.columns, need)
        if not any(c in reader.columns for c in lazy):
            raise VopdError(f"{path} has no image column (expected {' or '.join(lazy)})")
        yield from reader.rows(lazy, nullable)


def read_tsv(path: Path, need: Sequence[str] = ()) -> list[dict[str, Any]]:
    """A VLMEvalKit-style TSV (every cell a string; empty cells become None). An `image` cell that only names
    another row's index stands for that row's image, as in VLMEvalKit's own files."""
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise VopdError(f"{path}: cannot read as TSV ({str(e).splitlines()[0]})") from None
    require_columns(path, df.columns, need)
    rows = [{k: (v if v != "" else None) for k, v in r.items()} for r in df.to_dict(orient="records")]
    if "image" in df.columns and "index" in df.columns:
        by_index = {r["index"]: r["image"] for r in rows if r.get("image") and len(r["image"]) > 64}
        for r in rows:
            img = r.get("image")
            if img and len(img) <= 64 and img in by_index:
                r["image"] = by_index[img]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Text


_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s?(.*)$")


def split_option_lines(text: str) -> tuple[str, tuple[str, ...], str]:
    """Split "question\\n(A) x\\n(B) y[\\ntail]" into (question, options, tail). Options must run A, B, … on
    consecutive lines; with none, options is empty and the question is the whole text."""
    lines = text.split("\n")
    start = next((i for i, ln in enumerate(lines) if ln.startswith("(A)")), None)
    if start is None:
        return text, (), ""
    options: list[str] = []
    i = start
    while i < len(lines):
        m = _OPTION_LINE.match(lines[i])
        if not m or m.group(1) != LETTERS[len(options)]:
            break
        options.append(m.group(2).strip())
        i += 1
    return "\n".join(lines[:start]), tuple(options), "\n".join(lines[i:])


def strip_image_token(text: str) -> str:
    """Drop the `<image>` placeholder some files keep in the question (the image goes first anyway)."""
    return text.replace("<image>", "").strip()


_LETTER_ANSWER = re.compile(r"^[\(\[]?([A-Za-z])[\)\]]?(?:[.:\s]|$)")


def letter_answer(raw: Any) -> str:
    """The letter of a lettered answer: "(A)", "A", "a", "B. red" -> "A"/"B"; anything else is returned as is
    (stripped) for the spec to reject."""
    text = str(raw).strip()
    m = _LETTER_ANSWER.match(text)
    return m.group(1).upper() if m else text


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def open_answer_type(answer: Any) -> str:
    """Free-form answers that are a number are scored as numbers ("3" matches "three"), the rest as text."""
    return "number" if _NUMBER.fullmatch(str(answer).strip().replace(",", "")) else "short"


def present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and value != value) and str(value).strip() != ""
