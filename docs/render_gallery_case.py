"""Render one case of a gap report's HTML failure gallery to a PNG, for the README and the docs.

    python docs/render_gallery_case.py reports/toy/report.html test-00005 docs/assets/gallery-case.png

The case is cut out of the report with the report's own stylesheet and photographed by headless Chromium
(Debian: `apt-get install chromium`), so the picture is what a reader of `report.html` sees.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image, ImageChops


def case_page(report: str, case: str) -> str:
    """A page holding the report's stylesheet and the one gallery case `case` (a sample id)."""
    style = re.search(r"<style>.*?</style>", report, re.S)
    article = re.search(rf'<article class="case" id="case-[^"]*-{re.escape(case)}">.*?</article>', report, re.S)
    if style is None or article is None:
        raise SystemExit(f"no gallery case {case!r} in the report")
    return ('<!doctype html><html><head><meta charset="utf-8">' + style.group(0)
            + "<style>body { background: #fff; } main { padding: 12px; max-width: none; }</style></head>"
            + f"<body><main>{article.group(0)}</main></body></html>")


def trim(path: Path, margin: int = 12) -> None:
    """Cut the white below and right of the case, keeping a margin."""
    img = Image.open(path).convert("RGB")
    box = ImageChops.difference(img, Image.new("RGB", img.size, (255, 255, 255))).getbbox()
    if box:
        img.crop((0, 0, min(img.width, box[2] + margin), min(img.height, box[3] + margin))).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("case", help="sample id of a gallery case, e.g. test-00005")
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=600)
    args = parser.parse_args()
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("Chromium is needed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "case.html"
        page.write_text(case_page(args.report.read_text(), args.case))
        shot = Path(tmp) / "case.png"
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", f"--window-size={args.width},1000",
                        f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
        trim(shot)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
