"""Tiny random checkpoints of every VLM family in `vopd_bench.tiny.TINY_FAMILIES`, each built at most once per
test session however many test modules ask for it.

Use from a test module: `from tiny_fixtures import tiny_family_dir  # noqa: F401` and then a test argument
`tiny_family_dir`, called with a family name: `path = tiny_family_dir("gemma3")`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

# Shared by every module that imports the fixture (pytest gives each importing module its own fixture
# definition, so a session-scoped fixture alone would build once per module).
_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory) -> Callable[[str], Path]:
    from vopd_bench.tiny import build_tiny

    def get(family: str) -> Path:
        if family not in _BUILT:
            _BUILT[family] = build_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"), seed=0)
        return _BUILT[family]

    return get
