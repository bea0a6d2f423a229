"""The paper's published numbers, as data (Vision-OPD, arXiv 2605.18740).

These are numbers *someone else reported*; vopd never measured them. They exist so a leaderboard can put a
measured run next to the paper's rows, and they are always labelled `published` with the exact place they come
from. Nothing here may be averaged into, or mixed with, measured numbers.

Values are typed in as the paper prints them (accuracy in %, so they can be checked against the digest line by
line) and converted to fractions, like every measured number in vopd, by `published_rows`.

Sources (tags as in the research digest `paper.md` §0):
- `[v1]`: the v1 PDF. Table 1 (§6.1) uses MME-RealWorld-Lite; Fig. 3 (§1) gives the ZoomBench gaps.
- `[v2*]`: the v2 Table 1 (§6.1b), second-hand: MME-RealWorld-EN replaces Lite. The Qwen3.5 / Vision-OPD rows
  are exact; the other rows were re-quoted rounded to 0.1 and some give only EN and the average.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

# Benchmark names as the registry knows them, in the paper's column order.
V1_MEMBERS = ("vstar", "zoombench", "hrbench-4k", "hrbench-8k", "mme-realworld-lite", "mme-realworld-cn")
V2_MEMBERS = ("vstar", "zoombench", "hrbench-4k", "hrbench-8k", "mme-realworld", "mme-realworld-cn")
# Every benchmark with a published column, in the paper's order (v1's Lite and v2's EN side by side).
PAPER_BENCHMARKS = ("vstar", "zoombench", "hrbench-4k", "hrbench-8k", "mme-realworld-lite", "mme-realworld",
                    "mme-realworld-cn")
# The paper's headline: the unweighted mean of the six fine-grained benchmarks (full image, single pass).
AVERAGES = {"avg_v1": V1_MEMBERS, "avg_v2": V2_MEMBERS}


@dataclass(frozen=True)
class PublishedRow:
    """One row of a published table. `values_pct` maps leaderboard columns (`vstar:full`, `zoombench:gap`,
    `avg_v1:full`, ...) to the number printed in the paper, in % or points."""

    model: str  # as the paper names it, e.g. "Qwen3.5-4B"
    table: str  # "v1 Table 1", "v2 Table 1", "v1 Fig. 3"
    tag: str  # "[v1]" or "[v2*]"
    ref: str  # where in the research digest, e.g. "paper.md §6.1"
    values_pct: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.model} (paper {self.table})"

    def fractions(self) -> dict[str, float]:
        # Decimal keeps 84.29 -> 0.8429 exact to the nearest float (84.29 / 100 is not).
        return {k: float(Decimal(v) / 100) for k, v in self.values_pct.items()}


def _v1(model: str, vstar: str, zoom: str, hr4k: str, hr8k: str, lite: str, cn: str, avg: str) -> PublishedRow:
    values = dict(zip((f"{b}:full" for b in V1_MEMBERS), (vstar, zoom, hr4k, hr8k, lite, cn), strict=True))
    values["avg_v1:full"] = avg
    return PublishedRow(model, "v1 Table 1", "[v1]", "paper.md §6.1", values)


def _v2(model: str, vstar: str, zoom: str, hr4k: str, hr8k: str, en: str, cn: str, avg: str,
        note: str = "") -> PublishedRow:
    values = dict(zip((f"{b}:full" for b in V2_MEMBERS), (vstar, zoom, hr4k, hr8k, en, cn), strict=True))
    values["avg_v2:full"] = avg
    return PublishedRow(model, "v2 Table 1", "[v2*]", "paper.md §6.1b", values, note)


def _v2_partial(model: str, values: dict[str, str], note: str) -> PublishedRow:
    return PublishedRow(model, "v2 Table 1", "[v2*]", "paper.md §6.1b", values, note)


# Table 1 [v1]: accuracy (%), full image, single pass. MME-RW column = Lite.
TABLE1_V1: tuple[PublishedRow, ...] = (
    _v1("DeepEyes-7B", "85.86", "46.51", "75.13", "72.63", "53.20", "64.09", "66.24"),
    _v1("Thyme-7B", "82.20", "45.09", "77.00", "72.00", "55.18", "64.59", "66.01"),
    _v1("DeepEyesV2-7B", "81.68", "44.97", "77.88", "73.75", "51.59", "65.07", "65.82"),
    _v1("SenseNova-MARS-8B", "92.15", "47.81", "83.13", "78.38", "43.67", "68.90", "69.01"),
    _v1("GPT-5.2", "79.06", "50.89", "81.12", "78.38", "47.06", "68.80", "67.55"),
    _v1("GPT-5.4", "76.96", "52.66", "84.00", "77.88", "48.10", "70.93", "68.42"),
    _v1("Gemini-3.1-Pro", "87.96", "61.18", "89.63", "86.88", "49.50", "73.31", "74.74"),
    _v1("Qwen3.5-4B", "84.29", "47.69", "84.38", "80.13", "35.80", "63.70", "66.00"),
    _v1("Qwen3.5-9B", "82.72", "52.07", "85.75", "80.63", "46.12", "67.67", "69.16"),
    _v1("MiMo-VL-RL-7B", "83.25", "45.68", "73.50", "69.38", "39.50", "55.89", "61.20"),
    _v1("Qwen3-VL-Instruct-8B", "84.82", "42.96", "79.63", "75.25", "46.53", "64.61", "65.63"),
    _v1("ZwZ-8B", "87.96", "56.69", "83.63", "81.75", "54.35", "68.09", "72.08"),
    _v1("MiniCPM-V-4.5-9B", "70.68", "42.60", "69.63", "61.50", "42.31", "61.64", "58.06"),
    _v1("GLM-4.6V-106B", "86.91", "50.06", "82.13", "78.88", "43.10", "65.62", "67.78"),
    _v1("Qwen3-VL-Instruct-235B", "91.10", "56.09", "86.13", "80.38", "42.83", "69.04", "70.93"),
    _v1("Qwen3.5-397B", "87.96", "57.16", "89.38", "85.50", "45.39", "69.82", "72.54"),
    _v1("Kimi-K2.5-1T", "87.43", "52.43", "80.00", "75.25", "56.38", "65.71", "69.53"),
    _v1("Vision-OPD-4B", "92.15", "59.76", "84.50", "80.38", "55.45", "70.76", "73.83"),
    _v1("Vision-OPD-9B", "94.76", "65.80", "88.13", "85.50", "49.56", "70.46", "75.70"),
)

_ROUNDED = "re-quoted rounded to 0.1 (Vision-RL² README)"

# Table 1 [v2*]: MME-RW column = EN. Only what the sources quote; nothing filled in from v1.
TABLE1_V2: tuple[PublishedRow, ...] = (
    _v2("Qwen3.5-4B", "84.29", "47.69", "84.38", "80.13", "63.86", "63.70", "70.68"),
    _v2("Vision-OPD-4B", "92.15", "59.76", "84.50", "80.38", "74.88", "70.76", "77.07"),
    _v2("Qwen3.5-9B", "82.72", "52.07", "85.75", "80.63", "71.40", "67.67", "73.37"),
    _v2("Vision-OPD-9B", "94.76", "65.80", "88.13", "85.50", "73.40", "70.46", "79.68"),
    _v2("GPT-5.4", "77.0", "52.7", "84.0", "77.9", "74.2", "70.9", "72.8", note=_ROUNDED),
    _v2("Gemini-3.1-Pro", "88.0", "61.2", "89.6", "86.9", "76.5", "73.3", "79.3", note=_ROUNDED),
    _v2("Qwen3-VL-Instruct-235B", "91.1", "56.1", "86.1", "80.4", "71.7", "69.0", "75.8", note=_ROUNDED),
    _v2("Qwen3.5-397B", "88.0", "57.2", "89.4", "85.5", "74.8", "69.8", "77.4", note=_ROUNDED),
    _v2("Kimi-K2.6-1T", "88.5", "53.1", "81.9", "78.0", "69.2", "66.1", "72.8", note=_ROUNDED),
    _v2_partial("DeepEyes-7B", {"mme-realworld:full": "64.1", "avg_v2:full": "68.1"}, _ROUNDED + "; EN and Avg only"),
    _v2_partial("Thyme-7B", {"mme-realworld:full": "64.8", "avg_v2:full": "67.6"}, _ROUNDED + "; EN and Avg only"),
    _v2_partial("DeepEyesV2-7B", {"mme-realworld:full": "64.9", "avg_v2:full": "68.0"},
                _ROUNDED + "; EN and Avg only"),
    _v2_partial("GLM-4.6V-106B", {"avg_v2:full": "71.53"}, "Avg only (Korean survey note)"),
    _v2_partial("SenseNova-MARS-8B", {"avg_v2:full": "73.05"}, "Avg only (Korean survey note)"),
)

# Fig. 3 [v1]: ZoomBench regional (crop) − global (full) accuracy, in points. Only the gap is published; the
# per-view accuracies in the digest are derived, so they are not repeated here.
FIG3_GAPS: tuple[PublishedRow, ...] = tuple(
    PublishedRow(model, "v1 Fig. 3", "[v1]", "paper.md §1", {"zoombench:gap": gap},
                 "ZoomBench dual view: regional (benchmark crop) − global")
    for model, gap in (("Qwen3.5-4B", "21.7"), ("Qwen3.5-9B", "19.5"), ("GLM-4.6V-106B", "22.1"),
                       ("GPT-5.4", "19.3"), ("Gemini-3.1-Pro", "18.1"))
)

ALL_PUBLISHED: tuple[PublishedRow, ...] = TABLE1_V1 + TABLE1_V2 + FIG3_GAPS


def printed(label: str, column: str) -> str | None:
    """The number as the paper prints it (e.g. "77.0", "84.29") for a row label and leaderboard column."""
    for r in ALL_PUBLISHED:
        if r.label == label:
            return r.values_pct.get(column)
    return None


def published_rows() -> list[dict]:
    """Every published row as a flat dict: `model` (labelled with its table), `source` = "published",
    `source_ref` (table, tag and digest section), `note`, then its values as fractions."""
    out = []
    for r in ALL_PUBLISHED:
        row = {"model": r.label, "source": "published", "source_ref": f"paper {r.table} {r.tag}, {r.ref}",
               "note": r.note}
        row.update(r.fractions())
        out.append(row)
    return out
