"""`synthetic`: a procedural, offline benchmark of small shapes on a canvas.

Each image holds several shapes; the question names exactly one of them ("What colour is the triangle?") and
comes with lettered options and the target's tight box. Everything is a pure function of (world, seed, split,
index), so any sample can be rebuilt on its own and images are byte-identical across runs.

By default the options list every colour in a fixed order ("(A) red" ... "(G) cyan") and the answer cycles over
them, so letters are exactly balanced. `option_mode="shuffled"` instead draws `n_options` values in random
order, which also asks a model to bind the colour it sees to the letter it reads; the ~1M-parameter toy could
not learn that binding from scratch within a CPU-minutes budget, so the default world does not ask for it.

Names: `synthetic` (the test split), `synthetic:train`, `synthetic:validation`, `synthetic:test`. The CLI's
`--seed` picks the world seed; seed 0 is the published benchmark (and the one the toy model card reports on).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from vopd_bench.benchmarks import register
from vopd_bench.benchmarks.spec import BenchmarkSpec, LoadContext
from vopd_bench.errors import VopdError
from vopd_bench.geometry import Box
from vopd_bench.samples import LETTERS, Sample

SPLITS = ("train", "validation", "test")
# Multiples of 504 = 7 * 8 * 9 keep the answer letters exactly balanced for 2-9 options and 1-2 attributes
# (with 2 attributes: for option counts dividing 252).
SPLIT_SIZES = {"train": 25200, "validation": 504, "test": 504}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 205, 215),
}
SHAPES = ("circle", "square", "triangle", "diamond")
STYLES = ("achromatic", "coloured", "mixed")
OPTION_MODES = ("all", "shuffled")
ATTRIBUTES = ("colour", "shape")
QUESTIONS = {
    "colour": "What colour is the {shape}?",  # the named shape is unique in the image
    "shape": "What shape is the {colour} object?",  # the named colour is unique in the image
}


@dataclass(frozen=True)
class SyntheticWorld:
    """The parameters of the world. Sizes and counts are drawn per sample from the inclusive ranges."""

    canvas: int = 224  # square canvas side in pixels
    n_objects: tuple[int, int] = (4, 8)  # objects per image, target included (distractors = n - 1)
    target_radius: tuple[int, int] = (6, 24)  # half the target's side, in pixels
    distractor_radius: tuple[int, int] = (6, 18)
    style: str = "achromatic"  # distractors: "achromatic" (gray), "coloured", or "mixed" (each one 50/50)
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    attributes: tuple[str, ...] = ("colour",)  # the attributes asked, cycled per sample; each is a category
    # "all": the options are every value of the attribute in the world's order (colours A-G), the answer
    # cycled over them. "shuffled": `n_options` values drawn at random, the answer at a cycled position.
    option_mode: str = "all"
    n_options: int = 4  # used by "shuffled" only
    margin: int = 4  # minimum gap in pixels between objects and from the canvas edge
    background: tuple[int, int, int] = (235, 235, 235)
    gray_levels: tuple[int, int] = (60, 185)  # achromatic distractors are drawn from this gray range

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise VopdError(f"unknown distractor style {self.style!r}; expected one of {', '.join(STYLES)}")
        unknown = [c for c in self.colours if c not in COLOURS] + [s for s in self.shapes if s not in SHAPES]
        unknown += [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown:
            raise VopdError(f"unknown colours, shapes or attributes in the synthetic world: {unknown}")
        if not self.attributes:
            raise VopdError("the synthetic world needs at least one attribute to ask about")
        if self.option_mode not in OPTION_MODES:
            raise VopdError(f"unknown option mode {self.option_mode!r}; expected one of {', '.join(OPTION_MODES)}")
        pools = [len(self.pool(a)) for a in self.attributes]
        if self.option_mode == "shuffled" and not 2 <= self.n_options <= min(pools):
            raise VopdError(f"n_options must be between 2 and {min(pools)} for this world")
        if min(pools) < 2 or len(set(self.colours)) < len(self.colours) or len(set(self.shapes)) < len(self.shapes):
            raise VopdError("the synthetic world needs at least 2 distinct colours and shapes")
        if self.n_objects[0] < 1 or self.n_objects[1] < self.n_objects[0]:
            raise VopdError(f"invalid object-count range {self.n_objects}")

    def pool(self, attribute: str) -> tuple[str, ...]:
        """The values an attribute can take, in the world's order."""
        return self.colours if attribute == "colour" else self.shapes

    def options_per_question(self, attribute: str) -> int:
        return len(self.pool(attribute)) if self.option_mode == "all" else self.n_options


@dataclass(frozen=True)
class Shape:
    kind: str
    cx: int
    cy: int
    r: int
    rgb: tuple[int, int, int]
    colour: str | None  # the colour's name, None for gray

    def polygon(self) -> list[tuple[int, int]] | None:
        cx, cy, r = self.cx, self.cy, self.r
        if self.kind == "triangle":
            return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
        if self.kind == "diamond":
            return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
        return None

    def draw(self, draw: ImageDraw.ImageDraw, fill: Any) -> None:
        xy = (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)
        if self.kind == "circle":
            draw.ellipse(xy, fill=fill)
        elif self.kind == "square":
            draw.rectangle(xy, fill=fill)
        else:
            draw.polygon(self.polygon(), fill=fill)


@dataclass(frozen=True)
class Scene:
    """A laid-out image. `render` is what `Sample.image` calls, so images are drawn only when needed."""

    canvas: int
    background: tuple[int, int, int]
    objects: tuple[Shape, ...]  # the target is objects[0]; it is drawn last

    def render(self) -> Image.Image:
        img = Image.new("RGB", (self.canvas, self.canvas), self.background)
        draw = ImageDraw.Draw(img)
        for obj in (*self.objects[1:], self.objects[0]):
            obj.draw(draw, obj.rgb)
        return img

    def mask(self, i: int = 0) -> Image.Image:
        """The pixels of object `i` alone (mode "1")."""
        m = Image.new("1", (self.canvas, self.canvas), 0)
        self.objects[i].draw(ImageDraw.Draw(m), 1)
        return m

    def target_box(self) -> Box:
        """The tight box of the target's pixels: xyxy with exclusive right/bottom edges, like PIL's getbbox."""
        x1, y1, x2, y2 = self.mask(0).getbbox()
        return (float(x1), float(y1), float(x2), float(y2))


def sample_seed(world_seed: int, split: str, index: int) -> str:
    # random.Random hashes a str seed with SHA-512: stable across processes and Python versions.
    return f"vopd-synthetic/{world_seed}/{split}/{index}"


def make_sample(index: int, split: str = "test", world: SyntheticWorld = SyntheticWorld(), seed: int = 0) -> Sample:
    """Build sample `index` of `split`. Pure: the same arguments always give the same sample and image."""
    if split not in SPLITS:
        raise VopdError(f"unknown synthetic split {split!r}; expected one of {', '.join(SPLITS)}")
    rng = random.Random(sample_seed(seed, split, index))
    # Cycling makes the attributes, and the answer letters within each, exactly balanced over any run of
    # len(attributes) * options_per_question samples.
    attribute = world.attributes[index % len(world.attributes)]
    answer_pos = (index // len(world.attributes)) % world.options_per_question(attribute)
    pool = world.pool(attribute)
    if world.option_mode == "all":
        options, truth = pool, pool[answer_pos]
    else:
        truth = rng.choice(pool)
        others = rng.sample([p for p in pool if p != truth], world.n_options - 1)
        options = tuple(others[:answer_pos] + [truth] + others[answer_pos:])
    scene = _layout(rng, world, attribute, truth)
    target = scene.objects[0]
    if attribute == "colour":
        question = QUESTIONS["colour"].format(shape=target.kind)
    else:
        question = QUESTIONS["shape"].format(colour=target.colour)
    box = scene.target_box()
    side = max(box[2] - box[0], box[3] - box[1])
    prefix = f"s{seed}-" if seed else ""
    return Sample(
        id=f"{prefix}{split}-{index:05d}",
        image=scene.render,
        question=question,
        options=options,
        answer=LETTERS[answer_pos],
        answer_type="mcq",
        boxes=(box,),
        category=attribute,
        metadata={
            "split": split, "index": index, "seed": seed, "style": world.style,
            "target_shape": target.kind, "target_colour": target.colour, "target_radius": target.r,
            "target_side": side, "n_distractors": len(scene.objects) - 1, "canvas": world.canvas, "answer_pos": answer_pos,
            "objects": [(o.kind, o.colour or f"gray{o.rgb[0]}", o.cx, o.cy, o.r) for o in scene.objects],
        },
    )


def make_samples(split: str = "test", world: SyntheticWorld = SyntheticWorld(), seed: int = 0,
                 n: int | None = None, start: int = 0) -> list[Sample]:
    """Samples start .. start+n-1 of `split` (n defaults to the rest of the split's standard size)."""
    stop = SPLIT_SIZES[split] if n is None else start + n
    return [make_sample(i, split, world, seed) for i in range(start, stop)]


def _layout(rng: random.Random, world: SyntheticWorld, attribute: str, truth: str) -> Scene:
    """Place the target (whose asked attribute is `truth`) and its distractors without overlap; the attribute
    the question names stays unique."""
    n = rng.randint(*world.n_objects)
    t_kind = truth if attribute == "shape" else rng.choice(world.shapes)
    t_colour = truth if attribute == "colour" else rng.choice(world.colours)
    radii = [rng.randint(*world.target_radius)] + [rng.randint(*world.distractor_radius) for _ in range(n - 1)]
    centres = _place(rng, world, radii)
    objects = [Shape(t_kind, *centres[0], radii[0], COLOURS[t_colour], t_colour)]
    for (cx, cy), r in zip(centres[1:], radii[1:], strict=True):
        coloured = world.style == "coloured" or (world.style == "mixed" and rng.random() < 0.5)
        if attribute == "colour":
            # The named shape must be unique: distractors take the other shapes, any colour.
            kind = rng.choice([s for s in world.shapes if s != t_kind])
            colour = rng.choice(world.colours) if coloured else None
        else:
            # The named colour must be unique: distractors take any shape, other colours.
            kind = rng.choice(world.shapes)
            colour = rng.choice([c for c in world.colours if c != t_colour]) if coloured else None
        if colour is None:
            g = rng.randint(*world.gray_levels)
            objects.append(Shape(kind, cx, cy, r, (g, g, g), None))
        else:
            objects.append(Shape(kind, cx, cy, r, COLOURS[colour], colour))
    return Scene(world.canvas, world.background, tuple(objects))


def _place(rng: random.Random, world: SyntheticWorld, radii: list[int]) -> list[tuple[int, int]]:
    """Rejection-sample centres so that no two shapes' squares come within `margin` of each other."""
    for _ in range(100):
        centres: list[tuple[int, int]] = []
        for r in radii:
            lo, hi = r + world.margin, world.canvas - 1 - r - world.margin
            if hi < lo:
                break
            for _ in range(200):
                c = (rng.randint(lo, hi), rng.randint(lo, hi))
                if all(max(abs(c[0] - x), abs(c[1] - y)) > r + q + world.margin
                       for (x, y), q in zip(centres, radii, strict=False)):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres
    raise VopdError(f"cannot place {len(radii)} objects on a {world.canvas}px canvas; enlarge it or shrink the objects")


@register("synthetic")
def synthetic_spec(arg: str | None, world: SyntheticWorld = SyntheticWorld()) -> BenchmarkSpec:
    split = (arg or "test").strip().lower()
    if split not in SPLITS:
        raise VopdError(f"unknown synthetic split {arg!r}; expected one of {', '.join(SPLITS)}")

    def rows(ctx: LoadContext) -> Iterator[Mapping[str, Any]]:
        size = SPLIT_SIZES[split] if ctx.limit is None else min(ctx.limit, SPLIT_SIZES[split])
        for i in range(size):
            s = make_sample(i, split, world, ctx.seed)
            yield {"id": s.id, "sample": s}

    def find(sample_id: str, ctx: LoadContext) -> Sample | None:
        """`split-NNNNN` (`sS-split-NNNNN` under seed S): sample NNNNN, rebuilt alone."""
        head, _, index = sample_id.rpartition("-")
        prefix = f"s{ctx.seed}-" if ctx.seed else ""
        if head != f"{prefix}{split}" or not index.isdigit() or int(index) >= SPLIT_SIZES[split]:
            return None
        return make_sample(int(index), split, world, ctx.seed)

    return BenchmarkSpec(
        name="synthetic" if split == "test" else f"synthetic:{split}",
        source=f"procedural ({world.style} distractors, {world.canvas}px canvas)",
        load_rows=rows,
        to_sample=_row_sample,
        meta_fields=(),
        evidence="boxes",
        find=find,
    )


def _row_sample(row: Mapping[str, Any], spec: BenchmarkSpec, index: int) -> Sample:
    return row["sample"]


__all__ = ["COLOURS", "SHAPES", "SPLITS", "SPLIT_SIZES", "Scene", "Shape", "SyntheticWorld", "make_sample",
           "make_samples", "synthetic_spec"]
