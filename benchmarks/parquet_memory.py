"""Peak memory of reading an HR-Bench-8K-like parquet whose images all sit in one row group.

Writes a parquet in HR-Bench's layout (`hr_bench_8k.parquet`: index, question, A-D, answer, category,
cycle_category, and `image` as base64 JPEG text), every row distinct and all rows in ONE row group, of at least
`--size-gb`. Then, each in a fresh process, it measures the peak RSS above the process's own baseline (after
imports) of:

- `stream`: vopd's reader: `load("hrbench-8k")`, then every sample's image decoded in file order, as a run does;
- `whole-group` (for contrast): the image column of the row group read at once, as `read_row_group` does.

Target: `stream` under 25% of the file size above baseline.

Pages. Streaming works within a row group page by page, so it needs a column chunk of many data pages. Each
image here is its own page (`write_batch_size=1`; the page limit then holds). pyarrow's default writer checks
the page size only every 1,024 values, so a file of fewer rows written with defaults has ONE page per column
chunk, and every Parquet reader must decompress that page whole: `--one-page` writes such a file to show it.

    .venv/bin/python benchmarks/parquet_memory.py [--size-gb 1.1] [--dir /tmp/x] [--keep] [--one-page]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIDE = (2400, 1600)  # each image ~3 MB of JPEG noise, ~4 MB of base64


def _peak_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would inherit the
    writer's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux, not reset by exec


def write(path: Path, size_gb: float, one_page: bool = False) -> tuple[int, int]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    rows, total = [], 0
    while total < size_gb * 1e9:
        noise = rng.integers(0, 256, (SIDE[1], SIDE[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noise, "RGB").save(buf, "JPEG", quality=90)
        image = base64.b64encode(buf.getvalue()).decode("ascii")
        total += len(image)
        i = len(rows)
        rows.append({"index": i, "question": f"What is written on sign {i}?", "A": "a", "B": "b", "C": "c", "D": "d",
                     "answer": "ABCD"[i % 4], "category": "single", "cycle_category": f"cycle{i % 4 + 1}",
                     "image": image})
    table = pa.Table.from_pylist(rows)
    del rows
    pq.write_table(table, path, row_group_size=table.num_rows, use_dictionary=False,
                   write_batch_size=table.num_rows if one_page else 1)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    return table.num_rows, path.stat().st_size


def measure(mode: str, folder: Path) -> dict:
    import pyarrow.parquet as pq  # noqa: F401  (imports before the baseline)

    from vopd_bench.benchmarks import load
    from vopd_bench.images import load_image

    load("synthetic", limit=1)  # registers and imports every loader
    base = _peak_mb()
    n = 0
    if mode == "stream":
        for s in load("hrbench-8k", data_dir=str(folder)).samples:
            load_image(s.image)
            n += 1
    else:
        f = pq.ParquetFile(folder / "hr_bench_8k.parquet")
        col = f.read_row_group(0, columns=["image"]).column(0)
        n = len(col)
        for i in range(n):
            load_image(col[i].as_py())
    return {"mode": mode, "images": n, "baseline_mb": round(base), "peak_mb": round(_peak_mb()),
            "above_mb": round(_peak_mb() - base)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.1)
    ap.add_argument("--dir", default=None, help="where to write the parquet (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the parquet afterwards (and reuse a kept one)")
    ap.add_argument("--one-page", action="store_true", help="write each column chunk as one data page")
    ap.add_argument("--measure", choices=["stream", "whole-group"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.dir))))
        return
    folder = Path(args.dir or tempfile.mkdtemp(prefix="vopd-parquet-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hr_bench_8k.parquet"
    try:
        if args.keep and path.is_file():
            import pyarrow.parquet as pq

            n_rows, n_bytes = pq.ParquetFile(path).metadata.num_rows, path.stat().st_size
        else:
            n_rows, n_bytes = write(path, args.size_gb, args.one_page)
        pages = "one data page per column" if args.one_page else "one data page per image"
        print(f"file: {n_rows} rows in one row group, {pages}, {n_bytes / 1e6:.0f} MB ({path})")
        for mode in ("stream", "whole-group"):
            out = subprocess.run([sys.executable, __file__, "--measure", mode, "--dir", str(folder)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            share = r["above_mb"] * 1e6 / n_bytes
            print(f"{mode:12s} images={r['images']} baseline={r['baseline_mb']} MB peak={r['peak_mb']} MB "
                  f"above baseline={r['above_mb']} MB = {share:.1%} of the file")
    finally:
        if not args.keep:
            shutil.rmtree(folder) if args.dir is None else path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
