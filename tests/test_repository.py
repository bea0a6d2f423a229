"""Repository hygiene: nothing tracked points into a development machine's file system."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Home directories on Linux, macOS and Windows, root's home, and this project's development workspace. Built from
# pieces so that this file does not match itself. A path inside a URL ("example.org/home/x/") is not one.
MACHINE_PATH = re.compile(
    r"(?<![\w.])(?:" + "|".join([r"/home/[A-Za-z_][\w.-]*/", r"/Users/[A-Za-z_][\w.-]*/", r"[A-Za-z]:\\Users\\",
                      "/" + "root/", "/" + "work/"]) + ")"
)


def _tracked_files() -> list[Path]:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / name for name in listing.stdout.decode().split("\0") if name]


@pytest.mark.parametrize(
    "text, found",
    [("see /" + "home/alice/src/x.py", True), ("/" + "Users/bob/Library", True), ("C:\\" + "Users\\eve\\x", True),
     ("cd /" + "root/vopd", True), ("/" + "work/main/.venv/bin/python", True),
     ("reports/toy/report.md", False), ("/tmp/run", False), ("https://example.org/home/page/", False)],
)
def test_the_pattern_knows_a_machine_path(text: str, found: bool) -> None:
    assert bool(MACHINE_PATH.search(text)) is found


def test_no_tracked_file_holds_an_absolute_path_of_a_development_machine() -> None:
    files = _tracked_files()
    assert len(files) > 50  # the listing worked
    hits = []
    for path in files:
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary: weights, images
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)
