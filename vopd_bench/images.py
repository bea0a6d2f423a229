"""Turning an image source (path, bytes, base64 text, PIL image or a renderer) into one RGB PIL image.

Size limit. Every image is checked against a pixel limit from its header alone, before any pixel is decoded: a
few hundred KB of PNG can declare 20,000 × 20,000 pixels and decode to gigabytes. An image over the limit is a
per-sample error. The default, `DEFAULT_MAX_PIXELS` (100 MP), covers the largest images of every supported
benchmark with room to spare: HR-Bench 8K (7680 × 4320, about 33 MP) and MME-RealWorld's remote-sensing images
(over 5000 × 5000). `--max-image-pixels` changes it for a run (`set_max_pixels`).

Reduced decoding. A caller that only needs a small view of a large JPEG passes `need_pixels`: the JPEG decoder
then skips detail it would throw away (Pillow's `draft`, scales 1/2, 1/4, 1/8), never going below `need_pixels`.
The image keeps its full size in `info["original_size"]`.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vopd_bench.errors import SampleError, VopdError

DEFAULT_MAX_PIXELS = 100_000_000
_BASE64 = re.compile(r"[A-Za-z0-9+/\n\r]+={0,2}")

# vopd checks every image it opens against its own limit, from the header (`_check_size`). PIL's global guard
# would only add a warning at 89 MP and an exception type of its own at 179 MP, so it is turned off.
Image.MAX_IMAGE_PIXELS = None
_max_pixels = DEFAULT_MAX_PIXELS


class LazySource:
    """An image held elsewhere (a parquet cell, …) and fetched only when it is decoded. `raw()` returns an
    ordinary source (bytes, a path, an HF Image struct)."""

    def raw(self) -> ImageSource:
        raise NotImplementedError


ImageSource = str | Path | bytes | Image.Image | dict | LazySource | Callable[[], Image.Image]


def set_max_pixels(limit: int) -> None:
    """The process-wide pixel limit (`--max-image-pixels`)."""
    global _max_pixels
    if not isinstance(limit, int) or limit <= 0:
        raise VopdError(f"--max-image-pixels must be a positive number of pixels, got {limit!r}")
    _max_pixels = limit


def max_pixels() -> int:
    return _max_pixels


def load_image(source: ImageSource, *, need_pixels: int | None = None) -> Image.Image:
    """Decode `source` into an RGB image, or raise SampleError naming what was wrong (a missing file, bytes that
    are no image, a truncated image, a declared size over the pixel limit)."""
    try:
        if isinstance(source, LazySource):
            return load_image(source.raw(), need_pixels=need_pixels)
        if isinstance(source, Image.Image):
            img = source
        elif callable(source):
            img = source()
            if not isinstance(img, Image.Image):
                raise SampleError(f"image renderer returned {type(img).__name__}, not an image")
        elif isinstance(source, dict):  # HF `datasets` Image struct: {"bytes": ..., "path": ...}
            if source.get("bytes"):
                return load_image(source["bytes"], need_pixels=need_pixels)
            if source.get("path"):
                return load_image(source["path"], need_pixels=need_pixels)
            raise SampleError("image struct has neither bytes nor path")
        elif isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        elif isinstance(source, Path) or (isinstance(source, str) and _looks_like_path(source)):
            path = Path(source)
            if not path.is_file():
                raise SampleError(f"image file not found: {path}")
            img = Image.open(path)
        elif isinstance(source, str):
            img = Image.open(io.BytesIO(_b64decode(source)))
        else:
            raise SampleError(f"unsupported image source of type {type(source).__name__}")
        _check_size(img)
        original = img.size
        if need_pixels and img.format == "JPEG":
            _draft(img, need_pixels)
        img.load()
        if img.size != original:
            img.info["original_size"] = original
        return _to_rgb(img)
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise SampleError(f"corrupt or unreadable image: {_one_line(e)}") from None
    except MemoryError:
        raise SampleError("image too large to decode in the memory available") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, keeping 16-bit and float greys visible: PIL's own conversion clips them to 255 (a white image)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        scale = 255.0 / 65535.0 if top > 255 else (255.0 if img.mode == "F" and top <= 1.0 else 1.0)
        img = Image.fromarray(np.clip(a * scale, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def _check_size(img: Image.Image) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise SampleError(f"image declares an empty size {w}x{h}")
    if w * h > _max_pixels:
        raise SampleError(f"image declares {w}x{h} = {w * h / 1e6:.0f} MP, over the {_max_pixels / 1e6:g} MP limit "
                          "(--max-image-pixels); not decoded")


def _draft(img: Image.Image, need_pixels: int) -> None:
    """Let the JPEG decoder drop resolution it would not keep: the smallest DCT scale with at least
    `need_pixels` pixels (Pillow picks a scale whose size is at least the one asked for)."""
    w, h = img.size
    if w * h <= need_pixels:
        return
    f = math.sqrt(need_pixels / (w * h))
    img.draft("RGB", (max(1, math.ceil(w * f)), max(1, math.ceil(h * f))))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _looks_like_path(s: str) -> bool:
    """An existing file always wins; then base64 payloads are told apart by their alphabet and length."""
    if s.startswith("data:"):
        return False
    try:
        if len(s) < 4096 and Path(s).is_file():
            return True
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte: not a path
        return False
    return not (len(s) >= 16 and len(s) % 4 == 0 and _BASE64.fullmatch(s))


def _b64decode(s: str) -> bytes:
    if s.startswith("data:"):
        s = s.split(",", 1)[-1]
    try:
        return base64.b64decode(s, validate=False)
    except (binascii.Error, ValueError):
        raise SampleError("image string is neither a file path nor valid base64") from None


def image_path(source: ImageSource) -> Path | None:
    """The file `source` names, or None when it is not a file name (bytes, base64 text, an image in memory)."""
    if isinstance(source, Path):
        return source
    if isinstance(source, str) and _looks_like_path(source):
        return Path(source)
    if isinstance(source, dict) and source.get("path") and not source.get("bytes"):
        return image_path(source["path"])
    return None


def image_ref(source: ImageSource) -> str | None:
    """A serialisable reference to the image (its path), or None when it only lives in memory."""
    if isinstance(source, Path):
        return str(source.resolve())
    if isinstance(source, str) and _looks_like_path(source):
        return str(Path(source).resolve())
    if isinstance(source, dict) and source.get("path") and not source.get("bytes"):
        return str(source["path"])
    return None
