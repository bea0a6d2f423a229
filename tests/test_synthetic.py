"""The synthetic generator: deterministic, tight boxes, unique targets, balanced answers, distinct splits."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from vopd_bench import benchmarks
from vopd_bench.benchmarks.synthetic import (
    COLOURS,
    SPLIT_SIZES,
    SyntheticWorld,
    make_sample,
    make_samples,
    synthetic_spec,
)
from vopd_bench.errors import VopdError
from vopd_bench.images import load_image

N = 96


def _digest(sample) -> str:
    return hashlib.sha256(load_image(sample.image).tobytes()).hexdigest()


def test_deterministic_and_byte_identical():
    a = make_samples("test", n=24)
    b = make_samples("test", n=24)
    assert [_digest(s) for s in a] == [_digest(s) for s in b]
    assert [(s.id, s.question, s.options, s.answer, s.boxes) for s in a] == \
           [(s.id, s.question, s.options, s.answer, s.boxes) for s in b]
    # A sample rebuilt on its own equals the same index generated in sequence.
    assert _digest(make_sample(17, "test")) == _digest(a[17])
    # PNG encoding of the image is byte-identical too (what a user would save and share).
    import io

    def png(s):
        buf = io.BytesIO()
        load_image(s.image).save(buf, format="PNG")
        return buf.getvalue()

    assert png(a[3]) == png(make_sample(3, "test"))


def test_a_different_seed_gives_different_images_and_ids():
    a, b = make_sample(0, "test", seed=0), make_sample(0, "test", seed=1)
    assert _digest(a) != _digest(b)
    assert a.id != b.id


@pytest.mark.parametrize("style", ["achromatic", "coloured", "mixed"])
def test_box_is_tight_around_the_target_pixels(style):
    world = SyntheticWorld(style=style)
    for s in make_samples("validation", world, n=40):
        img = np.asarray(load_image(s.image)).astype(int)
        target = s.metadata["objects"][0]
        rgb = np.array(COLOURS[target[1]])
        # Independent check: the target is drawn last, so its pixels are exactly those of its colour within
        # its own bounding square (another object of the same colour may exist elsewhere in coloured styles).
        cx, cy, r = target[2], target[3], target[4]
        region = np.zeros(img.shape[:2], dtype=bool)
        region[cy - r:cy + r + 1, cx - r:cx + r + 1] = True
        mask = np.all(img == rgb, axis=-1) & region
        ys, xs = np.nonzero(mask)
        assert mask.sum() > 0
        assert s.boxes == ((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1),)
        # No other object's pixels touch the box: outside the target mask, the box holds only background.
        x1, y1, x2, y2 = (int(v) for v in s.boxes[0])
        inside = img[y1:y2, x1:x2]
        rest = inside[~mask[y1:y2, x1:x2]]
        assert np.all(rest == np.array(world.background))


def test_exactly_one_object_matches_the_question():
    for world in (SyntheticWorld(), SyntheticWorld(style="coloured", attributes=("colour", "shape")),
                  SyntheticWorld(style="mixed", option_mode="shuffled", attributes=("shape", "colour"))):
        samples = make_samples("test", world, n=N)
        assert {s.category for s in samples} == set(world.attributes)
        for s in samples:
            objects = s.metadata["objects"]
            if s.category == "colour":
                shape = s.question.removeprefix("What colour is the ").removesuffix("?")
                matches = [o for o in objects if o[0] == shape]
                truth = matches[0][1]
            else:
                colour = s.question.removeprefix("What shape is the ").removesuffix(" object?")
                matches = [o for o in objects if o[1] == colour]
                truth = matches[0][0]
            assert len(matches) == 1, s.id
            assert s.options["ABCDEFG".index(s.answer)] == truth
            assert len(set(s.options)) == len(s.options) == world.options_per_question(s.category)


def test_answers_are_exactly_balanced():
    samples = make_samples("test")
    counts = Counter(s.answer for s in samples)
    assert samples[0].options == tuple(COLOURS)  # the default lists every colour in a fixed order
    assert counts == {letter: len(samples) // 7 for letter in "ABCDEFG"}
    for world in (SyntheticWorld(attributes=("colour", "shape")),
                  SyntheticWorld(option_mode="shuffled", n_options=3, attributes=("colour", "shape"))):
        samples = make_samples("test", world)
        per_cat = Counter((s.category, s.answer) for s in samples)
        for cat in world.attributes:
            k = world.options_per_question(cat)
            assert {a: n for (c, a), n in per_cat.items() if c == cat} == {
                "ABCDEFG"[i]: len(samples) // 2 // k for i in range(k)}


def test_evidence_sizes_and_distractor_counts_vary():
    samples = make_samples("test", n=200)
    sides = [s.metadata["target_side"] for s in samples]
    n_dis = {s.metadata["n_distractors"] for s in samples}
    assert max(sides) / min(sides) >= 3
    assert n_dis == set(range(3, 8))
    areas = [(s.boxes[0][2] - s.boxes[0][0]) * (s.boxes[0][3] - s.boxes[0][1]) / 224**2 for s in samples]
    assert min(areas) < 0.005 and max(areas) > 0.03


def test_achromatic_distractors_are_gray():
    for s in make_samples("test", n=30):
        img = np.asarray(load_image(s.image)).astype(int)
        coloured = np.abs(img[..., 0] - img[..., 1]) + np.abs(img[..., 1] - img[..., 2]) > 0
        x1, y1, x2, y2 = (int(v) for v in s.boxes[0])
        coloured[y1:y2, x1:x2] = False
        assert not coloured.any()


def test_splits_differ():
    digests = {split: {_digest(s) for s in make_samples(split, n=30)} for split in ("train", "validation", "test")}
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]


def test_registry_resolution_and_names():
    assert "synthetic" in benchmarks.available()
    assert benchmarks.resolve("synthetic")[0].name == "synthetic"
    assert benchmarks.resolve("synthetic:test")[0].name == "synthetic"
    assert benchmarks.resolve("synthetic:train")[0].name == "synthetic:train"
    assert benchmarks.resolve("synthetic:validation")[0].name == "synthetic:validation"
    with pytest.raises(VopdError):
        benchmarks.resolve("synthetic:nope")
    loaded = benchmarks.load("synthetic", limit=10)
    assert [s.id for s in loaded.samples] == [f"test-{i:05d}" for i in range(10)]
    assert _digest(loaded.samples[4]) == _digest(make_sample(4, "test"))
    assert len(benchmarks.load("synthetic:validation").samples) == SPLIT_SIZES["validation"]
    assert loaded.samples[0].id != benchmarks.load("synthetic", limit=1, seed=3).samples[0].id


def test_prompt_renders_lettered_options():
    s = make_sample(1, "test")
    prompt = synthetic_spec(None).render_prompt(s.question, s.options)
    assert prompt.startswith(s.question + "\n(A) ")
    assert f"({s.answer}) {s.options['ABCD'.index(s.answer)]}" in prompt
    assert prompt.endswith("Answer with the option's letter from the given choices directly.")


def test_bad_world_parameters_raise_one_line_errors():
    with pytest.raises(VopdError, match="style"):
        SyntheticWorld(style="neon")
    with pytest.raises(VopdError, match="n_options"):
        SyntheticWorld(option_mode="shuffled", n_options=9)
    with pytest.raises(VopdError, match="option mode"):
        SyntheticWorld(option_mode="sorted")
    with pytest.raises(VopdError, match="cannot place"):
        make_sample(0, "test", SyntheticWorld(canvas=40, n_objects=(8, 8)))


def test_find_rebuilds_one_sample_as_the_split_holds_it():
    """`find` (failures.jsonl records without images) gives the very sample the loaded split has, alone."""
    from vopd_bench.benchmarks import load, resolve
    from vopd_bench.benchmarks.spec import LoadContext

    for name, seed in (("synthetic", 0), ("synthetic:validation", 3)):
        spec = resolve(name)[0]
        loaded = load(name, limit=6, seed=seed).samples
        for s in loaded[::5]:
            found = spec.find(s.id, LoadContext(seed=seed))
            assert found is not None and (found.id, found.question, found.options, found.answer, found.boxes) == \
                (s.id, s.question, s.options, s.answer, s.boxes)
            assert found.image().tobytes() == s.image().tobytes()
        other_seed = 1 if seed == 0 else 0
        assert spec.find(loaded[0].id, LoadContext(seed=other_seed)) is None  # another seed's ids differ
    spec = resolve("synthetic:train")[0]
    assert [spec.find(i, LoadContext()) for i in ("test-00001", "train-25200", "train-x", "")] == [None] * 4
    assert spec.find("train-25199", LoadContext()).id == "train-25199"
