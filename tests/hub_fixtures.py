"""Small copies of the hub benchmarks' dataset repositories, in their real schemas: the same file names and
layout, field names and types, box formats and image encodings (base64 strings, HF Image structs written by
`datasets`, and image files). Each `write_*` function writes one repository under `root` and returns its folder.

The rows are invented; where benchmarks.md quotes a real record (V* sa_4690: the glove), it is reused.
"""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import pandas as pd
from PIL import Image


def image_bytes(size: tuple[int, int], colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def b64(size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    """A base64 PNG. Noise keeps the text longer than 1 KiB, as every real image's is (vopd_bench.images reads a
    short string as a file path)."""
    noise = random.Random(sum(colour)).randbytes(size[0] * size[1] * 3)
    img = Image.blend(Image.new("RGB", size, colour), Image.frombytes("RGB", size, noise), 0.25)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def hf_image(size: tuple[int, int], colour: tuple[int, int, int], name: str = "img.png") -> dict:
    """An HF `datasets` Image cell as stored in parquet: {bytes, path}."""
    return {"bytes": image_bytes(size, colour), "path": name}


def write_hf_parquet(path: Path, columns: dict[str, list], image_columns: tuple[str, ...] = ("image",)) -> Path:
    """Write like `datasets.push_to_hub` does: image columns as Image features (struct<bytes, path> plus the
    `huggingface` schema metadata)."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict(columns)
    for col in image_columns:
        ds = ds.cast_column(col, datasets.Image())
    ds.to_parquet(str(path))
    return path


def write_plain_parquet(path: Path, rows: list[dict]) -> Path:
    """Write like pandas does (HR-Bench's and MME-RealWorld's base64 image strings are plain string columns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _save(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")


# ---------------------------------------------------------------------------------------------------------------


def write_vstar(root: Path) -> Path:
    """craigwu/vstar_bench: test_questions.jsonl plus per-image JSON annotations (xywh boxes)."""
    repo = root / "vstar_bench"
    _save(repo / "direct_attributes/sa_4690.jpg", (2000, 1500), (120, 90, 60))
    (repo / "direct_attributes/sa_4690.json").write_text(json.dumps(
        {"target_object": ["glove"], "bbox": [[564, 142, 155, 157]], "question": "What is the material of the glove?",
         "options": ["rubber", "cotton", "kevlar", "leather"]}))
    _save(repo / "relative_position/sa_100.jpg", (400, 300), (10, 200, 10))
    (repo / "relative_position/sa_100.json").write_text(json.dumps(
        {"target_object": ["cup", "plate"], "bbox": [[10, 20, 30, 40], [300, 200, 50, 60]],
         "question": "Is the cup on the left or right side of the plate?", "options": ["left", "right"]}))
    _save(repo / "relative_position/sa_79958.jpg", (400, 300), (0, 0, 200))
    (repo / "relative_position/sa_79958.json").write_text(json.dumps({"target_object": [], "bbox": []}))
    _save(repo / "direct_attributes/sa_5000.jpg", (400, 300), (50, 50, 50))  # no annotation file
    rows = [
        {"image": "direct_attributes/sa_4690.jpg", "text": "What is the material of the glove?\n(A) rubber\n(B) cotton\n"
         "(C) kevlar\n(D) leather\nAnswer with the option's letter from the given choices directly.", "label": "A",
         "category": "direct_attributes", "question_id": 0},
        {"image": "relative_position/sa_100.jpg", "text": "Is the cup on the left or right side of the plate?\n"
         "(A) right\n(B) left\nAnswer with the option's letter from the given choices directly.", "label": "B",
         "category": "relative_position", "question_id": 1},
        {"image": "relative_position/sa_79958.jpg", "text": "Is the dog on the left or right side of the car?\n"
         "(A) left\n(B) right\nAnswer with the option's letter from the given choices directly.", "label": "A",
         "category": "relative_position", "question_id": 2},
        {"image": "direct_attributes/sa_5000.jpg", "text": "What is the colour of the umbrella?\n(A) red\n(B) blue\n"
         "(C) green\n(D) black\nAnswer with the option's letter from the given choices directly.", "label": "C",
         "category": "direct_attributes", "question_id": 3},
    ]
    (repo / "test_questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return repo


def write_zoombench(root: Path, schema: str = "released") -> Path:
    """inclusionAI/ZoomBench: data/test.parquet. `released`: query/response and a bbox column; `card`:
    prompt/answer and no bbox."""
    repo = root / ("ZoomBench" if schema == "released" else "ZoomBench-card")
    q, a = ("query", "response") if schema == "released" else ("prompt", "answer")
    cols = {
        "id": ["zb-1", "zb-2", "zb-3"],
        q: ["How many windows does the red house have? Select from the following choices.\n(A) 3\n(B) 4\n(C) 5",
            "<image>\nWhat is written on the small sign?",
            "How many birds sit on the wire?"],
        a: ["B", "OPEN", "7"] if schema == "released" else ["(B)", "OPEN", "7"],
        "image": [hf_image((320, 240), (200, 0, 0)), hf_image((320, 240), (0, 200, 0)), hf_image((320, 240), (0, 0, 200))],
        "crop_image": [hf_image((60, 80), (255, 255, 0)), None, hf_image((40, 20), (0, 255, 255))],
        "question_type": ["mcq", "oq", "oq"],
    }
    if schema == "released":
        cols["bbox"] = [[100.0, 50.0, 130.0, 90.0], None, [10.0, 10.0, 30.0, 20.0]]
    write_hf_parquet(repo / "data/test-00000-of-00001.parquet", cols, image_columns=("image", "crop_image"))
    return repo


def textured(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like image: smooth random shapes plus fine grain, so its content survives resampling."""
    rng = random.Random(seed)
    w, h = size
    coarse = Image.frombytes("RGB", (w // 40, h // 40), rng.randbytes((w // 40) * (h // 40) * 3))
    mid = Image.frombytes("RGB", (w // 8, h // 8), rng.randbytes((w // 8) * (h // 8) * 3))
    grain = Image.frombytes("RGB", size, rng.randbytes(w * h * 3))
    smooth = Image.blend(coarse.resize(size, Image.BICUBIC), mid.resize(size, Image.BICUBIC), 0.4)
    return Image.blend(smooth, grain, 0.08)


def _png_struct(img: Image.Image, name: str) -> dict:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return {"bytes": buf.getvalue(), "path": name}


# ZoomBench rows without a bbox column, whose crops are cut from the image at these boxes (xyxy).
ZOOM_BOXES = {"zr-exact": (200, 120, 320, 210), "zr-x2": (40, 300, 130, 370)}


def write_zoombench_crops(root: Path) -> Path:
    """inclusionAI/ZoomBench as released (no bbox column) with real crops: one cut exactly, one cut and
    upscaled 2× (ZwZ's pipeline), one cut from another image (no match), one flat, one missing."""
    repo = root / "ZoomBench-crops"
    images = [textured(i, (480, 400)) for i in range(5)]
    exact = images[0].crop(ZOOM_BOXES["zr-exact"])
    b = ZOOM_BOXES["zr-x2"]
    x2 = images[1].crop(b).resize(((b[2] - b[0]) * 2, (b[3] - b[1]) * 2), Image.LANCZOS)
    foreign = textured(99, (480, 400)).crop((100, 100, 220, 190))
    crops = [exact, x2, foreign, Image.new("RGB", (60, 40), (90, 90, 90)), None]
    ids = ["zr-exact", "zr-x2", "zr-foreign", "zr-flat", "zr-none"]
    write_hf_parquet(repo / "data/test-00000-of-00001.parquet", {
        "id": ids,
        "query": [f"What colour is object {i}? Select from the following choices.\n(A) red\n(B) blue" for i in ids],
        "response": ["A", "B", "A", "B", "A"],
        "image": [_png_struct(im, f"{i}.png") for im, i in zip(images, ids, strict=True)],
        "crop_image": [None if c is None else _png_struct(c, f"{i}-crop.png") for c, i in zip(crops, ids, strict=True)],
        "question_type": ["multiple choice"] * 5,
    }, image_columns=("image", "crop_image"))
    return repo


def write_treebench(root: Path) -> Path:
    """HaochenWang/TreeBench: TreeBench.tsv with base64 images and `target_instances` list literals."""
    repo = root / "TreeBench"
    repo.mkdir(parents=True, exist_ok=True)
    base = {"multi-choice options": "", "E": ""}
    rows = [
        {**base, "index": 1, "image": b64((200, 100), (10, 20, 30)), "question": "Which sign is closer to the door?",
         "A": "the red one", "B": "the blue one", "C": "the green one", "D": "they are equally close",
         "answer": "C", "category": "Reasoning/Perspective Transform",
         "target_instances": "[[10, 20, 50, 60], [70, 20, 90, 40]]"},
        {**base, "index": 2, "image": b64((200, 100), (40, 50, 60)), "question": "What colour is the kite?",
         "A": "red", "B": "blue", "C": "", "D": "", "answer": "B", "category": "Perception/Attributes",
         "target_instances": "[]"},
        {**base, "index": 3, "image": b64((200, 100), (70, 80, 90)), "question": "What is written on the box?",
         "A": "STOP", "B": "GO", "C": "", "D": "", "answer": "A", "category": "Perception/OCR",
         "target_instances": "__import__('os').system('echo pwned')"},
        {**base, "index": 4, "image": "1", "question": "How many windows face the street?",
         "A": "2", "B": "3", "C": "4", "D": "", "answer": "A", "category": "Perception/Attributes",
         "target_instances": "[[0, 0, 20, 20]]"},
    ]
    pd.DataFrame(rows).to_csv(repo / "TreeBench.tsv", sep="\t", index=False)
    return repo


def write_hrbench(root: Path) -> Path:
    """DreamMr/HR-Bench: hr_bench_4k.parquet and hr_bench_8k.parquet, base64 image strings."""
    repo = root / "HR-Bench"

    def rows(n_cycles: int, size: tuple[int, int]) -> list[dict]:
        out = []
        for i, (question, opts, answer, category) in enumerate([
            ("What is the colour of the car parked by the tree?", ["red", "blue", "green", "white"], "B", "single"),
            ("Which object is to the left of the bench?", ["a lamp", "a bin", "a dog", "a bike"], "D", "cross"),
        ]):
            for c in range(n_cycles):
                rot = opts[c:] + opts[:c]  # circular option orders, as the cycles are
                out.append({"index": i * n_cycles + c, "question": question, "A": rot[0], "B": rot[1], "C": rot[2],
                            "D": rot[3], "answer": "ABCD"[(("ABCD".index(answer)) - c) % 4], "category": category,
                            "cycle_category": f"cycle{c + 1}", "image": b64(size, (30 * c, 100, 100))})
        return out

    write_plain_parquet(repo / "hr_bench_4k.parquet", rows(2, (400, 225)))
    write_plain_parquet(repo / "hr_bench_8k.parquet", rows(1, (800, 450)))
    return repo


def write_mme_realworld(root: Path) -> Path:
    """The three lmms-eval releases, side by side in one folder: data/*.parquet, base64 images in `bytes`."""
    en = [
        {"index": 0, "question": "What is the number on the bus?", "multi-choice options":
         ["(A) 13", "(B) 14", "(C) 15", "(D) 16", "(E) The image does not feature the number."], "answer": "B",
         "category": "Perception/OCR with Complex Context", "l2-category": "text recognition/license",
         "bytes": b64((300, 200), (1, 2, 3))},
        {"index": 1, "question": "Where is the car going?", "multi-choice options":
         ["(A) left", "(B) right", "(C) straight", "(D) back", "(E) The image does not feature the car."],
         "answer": "C", "category": "Reasoning/Autonomous_Driving", "l2-category": "intention/ego",
         "bytes": b64((300, 200), (4, 5, 6))},
    ]
    cn = [{"index": 0, "question": "图中公交车上的数字是多少？", "multi-choice options":
           ["(A) 13", "(B) 14", "(C) 15", "(D) 16", "(E) 图像中没有显示该数字。"], "answer": "A",
           "category": "Perception/OCR with Complex Context", "l2-category": "text recognition/license",
           "bytes": b64((300, 200), (7, 8, 9))},
          # full-width brackets, as some CN rows have them
          {"index": 1, "question": "路牌是什么颜色？", "multi-choice options":
           ["（A）红色", "（B） 蓝色", "(C) 绿色", "（D）白色", "（E）图像中没有显示路牌。"], "answer": "B",
           "category": "Perception/OCR with Complex Context", "l2-category": "text recognition/sign",
           "bytes": b64((300, 200), (9, 8, 7))}]
    lite = [{**en[1], "index": 7}]
    for folder, rows in (("MME-RealWorld-Lmms-eval", en), ("MME-RealWorld-CN-Lmms-eval", cn),
                         ("MME-RealWorld-lite-lmms-eval", lite)):
        write_plain_parquet(root / folder / "data/train-00000-of-00001.parquet", rows)
    return root


def write_visualprobe(root: Path) -> Path:
    """Mini-o3/VisualProbe_{Easy,Medium,Hard}: one folder each with val.json and images prefixed by the folder."""
    for level, items in (("Easy", [("What colour is the umbrella on the balcony?", "red"),
                                   ("How many boats are in the harbour?", "3")]),
                         ("Medium", [("What is written on the shop sign?", "BAKERY")]),
                         ("Hard", [("What animal is on the roof?", "cat")])):
        folder = root / f"VisualProbe_{level}"
        entries = []
        for i, (problem, solution) in enumerate(items):
            _save(folder / "images" / f"{level.lower()}{i}.jpg", (256, 192), (i * 40, 90, 150))
            entries.append({"images": [f"VisualProbe_{level}/images/{level.lower()}{i}.jpg"],
                            "problem": f"<image>\n{problem}", "solution": solution, "data_source": "visualprobe"})
        (folder / "val.json").write_text(json.dumps(entries, indent=1))
    return root


def write_mmvp(root: Path) -> Path:
    """MMVP/MMVP: Questions.csv and `MMVP Images/{Index}.jpg`."""
    repo = root / "MMVP"
    rows = [
        (1, "Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed", "(a)"),
        (2, "Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed", "(b)"),
        (3, "Is the dog facing left or right from the camera's perspective?", "(a) Left (b) Right", "(b)"),
        (4, "Is the dog facing left or right from the camera's perspective?", "(a) Left (b) Right", "(a)"),
    ]
    for index, *_ in rows:
        _save(repo / "MMVP Images" / f"{index}.jpg", (224, 224), (index * 50, 0, 0))
    pd.DataFrame(rows, columns=["Index", "Question", "Options", "Correct Answer"]).to_csv(repo / "Questions.csv",
                                                                                         index=False)
    return repo


def write_cvbench(root: Path, drop: str | None = None) -> Path:
    """nyu-visionx/CV-Bench: test_2d.parquet and test_3d.parquet with HF Image structs. `drop` leaves one text
    column out ("question" or "prompt"), in a copy named CV-Bench-no-<drop>."""
    repo = root / ("CV-Bench" if drop is None else f"CV-Bench-no-{drop}")
    q2 = "How many cars are in the image?"
    write = write_hf_parquet if drop is None else (
        lambda path, cols: write_hf_parquet(path, {k: v for k, v in cols.items() if k != drop}))
    write(repo / "test_2d.parquet", {
        "idx": [0, 1], "type": ["2D", "2D"], "task": ["Count", "Relation"],
        "image": [hf_image((64, 48), (9, 9, 9)), hf_image((64, 48), (19, 9, 9))],
        "question": [q2, "Considering the relative positions of the lamp and the sofa, where is the lamp?"],
        "choices": [["2", "3", "4"], ["left", "right"]], "answer": ["(B)", "(A)"],
        "prompt": [q2 + " Select from the following choices.\n(A) 2\n(B) 3\n(C) 4",
                   "Considering the relative positions of the lamp and the sofa, where is the lamp? Select from the "
                   "following choices.\n(A) left\n(B) right"],
        "filename": ["img/2D/count/coco_1.png", "img/2D/relation/ade20k_2.png"],
        "source": ["COCO", "ADE20K"], "source_dataset": ["COCO 2017 Validation", "ADE20K Validation"],
        "source_filename": ["1.jpg", "2.jpg"], "target_class": ["car", None], "target_size": [1200, None],
    })
    write(repo / "test_3d.parquet", {
        "idx": [0], "type": ["3D"], "task": ["Depth"], "image": [hf_image((64, 48), (29, 9, 9))],
        "question": ["Which is closer to the camera, the sink (highlighted by a red box) or the towel (highlighted by "
                     "a blue box)?"],
        "choices": [["sink", "towel"]], "answer": ["(A)"],
        "prompt": ["Which is closer to the camera, the sink (highlighted by a red box) or the towel (highlighted by "
                   "a blue box)? Select from the following choices.\n(A) sink\n(B) towel"],
        "filename": ["img/3D/depth/omni3d_1.png"], "source": ["Omni3D"], "source_dataset": ["SUN-RGBD"],
        "source_filename": ["x.jpg"], "bbox": [[[1.0, 2.0, 10.0, 12.0], [20.0, 5.0, 30.0, 15.0]]],
    })
    return repo


def write_mmstar(root: Path) -> Path:
    """Lin-Chen/MMStar: mmstar.parquet, options written into the question."""
    repo = root / "MMStar"
    write_hf_parquet(repo / "mmstar.parquet", {
        "index": [0, 1],
        "question": ["Which option describe the object relationship in the image correctly?\nOptions: A: The "
                     "suitcase is on the book., B: The suitcase is beneath the cat., C: The suitcase is beside the "
                     "book., D: The suitcase is beneath the bed.",
                     "What is the main colour of the bus? A red, B blue"],
        "image": [hf_image((96, 64), (5, 5, 5)), hf_image((96, 64), (6, 6, 6))],
        "answer": ["A", "B"], "category": ["coarse perception", "fine-grained perception"],
        "l2_category": ["image scene and topic", "recognition"],
        "meta_info": [{"source": "MMBench", "split": "val", "image_path": ["a.jpg"]},
                      {"source": "SEEDBench", "split": "val", "image_path": ["b.jpg"]}],
    })
    return repo


def write_pope(root: Path) -> Path:
    """lmms-lab/POPE (config default): data/test-*.parquet; question ids repeat across categories."""
    repo = root / "POPE"
    write_hf_parquet(repo / "data/test-00000-of-00001.parquet", {
        "id": ["0", "1", "2"], "question_id": ["1", "1", "2"],
        "question": ["Is there a dog in the image?", "Is there a dog in the image?", "Is there a car in the image?"],
        "answer": ["yes", "yes", "No"], "image_source": ["COCO_val2014_000000310196"] * 3,
        "image": [hf_image((40, 30), (1, 1, 1))] * 3, "category": ["adversarial", "popular", "random"],
    })
    return repo
