"""Turning an image source (path, bytes, base64 text, PIL image or a renderer) into one RGB PIL image."""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vopd_bench.errors import SampleError

ImageSource = str | Path | bytes | Image.Image | dict | Callable[[], Image.Image]

# Huge benchmark images (remote sensing, 8K) are legitimate: lift PIL's decompression-bomb guard to 300 MP.
Image.MAX_IMAGE_PIXELS = 300_000_000
_BASE64 = re.compile(r"[A-Za-z0-9+/\n\r]+={0,2}")


def load_image(source: ImageSource) -> Image.Image:
    """Decode `source` into an RGB image, or raise SampleError naming what was wrong."""
    try:
        if isinstance(source, Image.Image):
            img = source
        elif callable(source):
            img = source()
        elif isinstance(source, dict):  # HF `datasets` Image struct: {"bytes": ..., "path": ...}
            if source.get("bytes"):
                return load_image(source["bytes"])
            if source.get("path"):
                return load_image(source["path"])
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
        img.load()
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError(f"corrupt or unreadable image: {e}") from None
    return img.convert("RGB") if img.mode != "RGB" else img


def _looks_like_path(s: str) -> bool:
    """An existing file always wins; then base64 payloads are told apart by their alphabet and length."""
    if s.startswith("data:"):
        return False
    try:
        if len(s) < 4096 and Path(s).is_file():
            return True
    except OSError:  # e.g. a name too long for the file system: not a path
        return False
    return not (len(s) >= 16 and len(s) % 4 == 0 and _BASE64.fullmatch(s))


def _b64decode(s: str) -> bytes:
    if s.startswith("data:"):
        s = s.split(",", 1)[-1]
    try:
        return base64.b64decode(s, validate=False)
    except (binascii.Error, ValueError):
        raise SampleError("image string is neither a file path nor valid base64") from None


def image_ref(source: ImageSource) -> str | None:
    """A serialisable reference to the image (its path), or None when it only lives in memory."""
    if isinstance(source, Path):
        return str(source.resolve())
    if isinstance(source, str) and _looks_like_path(source):
        return str(Path(source).resolve())
    if isinstance(source, dict) and source.get("path") and not source.get("bytes"):
        return str(source["path"])
    return None
