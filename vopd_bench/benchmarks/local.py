"""`local:PATH`: a user's own JSONL, CSV or Parquet file.

Fields: id, image (path relative to the file, or absolute), question, options (list, optional), answer
(a letter when options exist), bbox (one [x1,y1,x2,y2] or a list of them; optional), bbox_format (xyxy by
default, or xywh), category (optional).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vopd_bench.benchmarks import register
from vopd_bench.benchmarks.spec import ROW_ERROR, BenchmarkSpec, LoadContext
from vopd_bench.errors import VopdError

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_table(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise VopdError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .csv or .parquet)")
    if not path.is_file():
        raise VopdError(f"{path}: file not found")
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    if path.stat().st_size == 0:
        raise VopdError(f"{path}: the file is empty")
    try:
        if kind == "json":
            df = pd.read_json(path, dtype=False)
        elif kind == "csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
        else:
            df = pd.read_parquet(path)
    except (ValueError, OSError) as e:  # pandas' and pyarrow's parse errors are ValueErrors or OSErrors
        raise VopdError(f"{path}: cannot read as {kind}: {_first_line(e)}") from None
    return df.to_dict(orient="records")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Line by line, so one malformed line becomes one recorded bad sample instead of a failed run. A file that
    is one JSON array of objects (a common slip: `.jsonl` holding `.json`) is read as its rows."""
    array = _json_array_rows(path) if _starts_with_bracket(path) else None
    if array is not None:
        return array
    rows: list[dict[str, Any]] = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                # Decoded per line so one non-UTF-8 line is one bad sample; a leading BOM is tolerated.
                row = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                row = {"id": f"line{n}", ROW_ERROR: f"line {n} is not a valid JSON object: {e}"}
            rows.append(row)
    if not rows:
        raise VopdError(f"{path}: holds only blank lines" if path.stat().st_size else f"{path}: the file is empty")
    return rows


def _starts_with_bracket(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _json_array_rows(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a file that is one JSON array, or None when the file is not one (then it is read as lines)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError:
        return None
    if not isinstance(data, list):
        return None
    if not data:
        raise VopdError(f"{path}: holds an empty JSON array")
    return [row if isinstance(row, dict) else
            {"id": f"item{i}", ROW_ERROR: f"item {i} of the JSON array is not a JSON object"}
            for i, row in enumerate(data)]


@register("local")
def local_spec(arg: str | None) -> BenchmarkSpec:
    if not arg:
        raise VopdError("local benchmark needs a path: local:PATH")
    path = Path(arg).expanduser()

    def rows(ctx: LoadContext) -> Iterator[Mapping[str, Any]]:
        for row in read_table(path):
            img = row.get("image")
            if isinstance(img, str) and img.strip() and not Path(img).is_absolute():
                row = {**row, "image": str(path.parent / img)}
            yield row

    return BenchmarkSpec(name=f"local:{path.stem}", source=str(path), load_rows=rows,
                         evidence="boxes where a row has a bbox")
