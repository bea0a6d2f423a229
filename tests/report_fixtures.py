"""Small real gap-report runs for the leaderboard, compare and HTML-report tests.

A `local:` benchmark of drawn images goes through the real runner (views, prompts, scoring, analysis,
outputs); only the model is replaced by a scripted backend whose every answer is fixed in advance, so each
test knows the exact accuracies to expect.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from vopd_bench.backends import GenerationConfig, Request, Response
from vopd_bench.runner import GapReportConfig, GapReportResult, run_gap_report
from vopd_bench.views import BOX_HINT

W, H = 200, 150
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40)}
NAMES = list(COLOURS)
LETTERS = "ABCD"

# outcome(i, view) -> "right" | "wrong" | "unparsed"
Outcome = Callable[[int, str], str]


def draw_sample(i: int) -> tuple[Image.Image, list[float]]:
    """A grey canvas with one coloured square whose size and place depend on i; returns it and its box."""
    img = Image.new("RGB", (W, H), (128, 128, 128))
    side = 6 + (i * 7) % 40
    x, y = 5 + (i * 37) % (W - side - 10), 5 + (i * 23) % (H - side - 10)
    ImageDraw.Draw(img).rectangle((x, y, x + side - 1, y + side - 1), fill=COLOURS[NAMES[i % 4]])
    return img, [x, y, x + side, y + side]


def answer_letter(i: int) -> str:
    return LETTERS[i % 4]


def question(i: int) -> str:
    return f"Q{i}: What colour is the square?"


def write_benchmark(folder: Path, n: int, name: str = "toyset") -> Path:
    """n samples as a local JSONL benchmark with PNG images; categories alternate `small`/`large` by index."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img, box = draw_sample(i)
        img.save(folder / f"img{i}.png")
        rows.append({"id": f"s{i:03d}", "image": f"img{i}.png", "question": question(i), "options": NAMES,
                     "answer": answer_letter(i), "bbox": box, "category": "even" if i % 2 == 0 else "odd"})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class SaysBackend:
    """Gives the same reply to every request."""

    def __init__(self, text: str):
        self.text = text

    def fingerprint(self) -> str:
        return f"says-{self.text}"

    def generate(self, requests: Sequence[Request], gen: GenerationConfig) -> list[Response]:
        return [Response(self.text) for _ in requests]

    def close(self) -> None:
        pass


class ScriptedBackend:
    """Answers by a fixed script: which sample (from the question) and which view (the box hint in the
    prompt, or an image smaller than the canvas for the crop) decide whether the answer is right."""

    name = "scripted"
    preferred_batch_size = 0

    def __init__(self, outcome: Outcome, tag: str = "scripted"):
        self.outcome, self.tag = outcome, tag

    def fingerprint(self) -> str:
        return f"scripted-{self.tag}"

    def generate(self, requests: Sequence[Request], gen: GenerationConfig) -> list[Response]:
        out = []
        for r in requests:
            i = int(re.search(r"Q(\d+):", r.prompt).group(1))
            view = "box" if BOX_HINT in r.prompt else "full" if r.image.size == (W, H) else "crop"
            kind = self.outcome(i, view)
            right = answer_letter(i)
            text = {"right": f"The answer is {right}.", "wrong": LETTERS[(LETTERS.index(right) + 1) % 4],
                    "unparsed": "I cannot see it."}[kind]
            out.append(Response(text))
        return out

    def close(self) -> None:
        pass


def run(bench: Path, out: Path, outcome: Outcome, model: str) -> GapReportResult:
    cfg = GapReportConfig(model=model, benchmarks=[f"local:{bench}"], out=str(out), quiet=True, batch_size=8)
    return run_gap_report(cfg, backend=ScriptedBackend(outcome, model))


SHARED_N = 24  # samples of the session's shared runs (conftest.before_after_runs)


def before_and_after_runs(tmp: Path, n: int) -> Path:
    """Two gap-report runs of one `n`-sample benchmark, `tmp/before` and `tmp/after`; returns `tmp`."""
    bench = write_benchmark(tmp / "data", n)
    run(bench, tmp / "before", before, "toy-before")
    run(bench, tmp / "after", after, "toy-after")
    return tmp


def before(i: int, view: str) -> str:
    """A model with a gap: the crop is mostly right, the full image mostly wrong."""
    if view == "full":
        return "right" if i % 3 == 0 else "wrong"
    if view == "crop":
        return "unparsed" if i == 5 else "right" if i % 4 != 3 else "wrong"
    return "right" if i % 2 == 0 else "wrong"


def after(i: int, view: str) -> str:
    """After distillation: more full-image answers right, the crop unchanged."""
    if view == "full":
        return "right" if i % 3 != 2 else "wrong"
    return before(i, view)


def count_right(outcome: Outcome, view: str, ids: Sequence[int]) -> int:
    return sum(outcome(i, view) == "right" for i in ids)
