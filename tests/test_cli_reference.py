"""The CLI reference page (docs/reference/cli.md) is generated from the Typer app by docs/gen_cli.py. A change to
a command, an option or a help text without regenerating the page fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "reference" / "cli.md"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_cli_reference_is_the_fresh_rendering():
    fresh = _generator().render()
    committed = PAGE.read_text()
    stale = [(n, a, b) for n, (a, b) in enumerate(zip(committed.splitlines(), fresh.splitlines(), strict=False), 1)
             if a != b]
    assert committed == fresh, f"docs/reference/cli.md is stale (run python docs/gen_cli.py); first diff: {stale[:1]}"


def test_the_page_names_every_command_and_every_option():
    """Walked independently of the generator: each `vopd` command has its section and each of its options and
    arguments appears in it."""
    from vopd_bench import cli

    cli._register_commands()
    group = typer.main.get_command(cli.app)
    page = PAGE.read_text()
    sections = {s.split("`", 1)[0]: s for s in page.split("\n## `vopd ")[1:]}
    assert set(sections) == set(group.commands) and len(sections) >= 6
    for name, command in group.commands.items():
        for param in command.params:
            if getattr(param, "hidden", False):
                continue
            for opt in [*param.opts, *param.secondary_opts]:
                assert f"`{opt}" in sections[name] or f" {opt}" in sections[name], (name, opt)
