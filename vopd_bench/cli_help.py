"""How `vopd … --help` renders: every default shown, no value placeholder after a flag.

Typer renders help with Rich markup, which reads `[default: runs/<model-slug>/]` in a help text as a style tag
and drops it, and Typer prints a type placeholder after every option, flags included (`--force <bool>`), as if
they took a value. The command classes here fix both for every vopd command, at render time only: the help
texts themselves stay plain, so anything else that reads them (a generated reference) gets them unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.markup import escape
from typer.core import TyperCommand, TyperGroup


def _render(text: str) -> str:
    """A help text as Rich should get it: markup escaped, and each paragraph's source line breaks joined (Rich
    mode keeps single line breaks, so a docstring wrapped in the source would print wrapped twice)."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return escape("\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs))


def is_flag(param: Any) -> bool:
    """An option that takes no value (`--force`, `--lora/--no-lora`)."""
    return bool(getattr(param, "is_flag", False)) and not getattr(param, "count", False)


@contextmanager
def _plain(command: Any, params: list[Any]) -> Iterator[None]:
    """Escape the help texts for Rich and blank the flags' placeholders while the help is rendered."""
    saved = [(p, p.help, p.metavar) for p in params if hasattr(p, "help")]
    saved_help = command.help
    try:
        for p, text, _ in saved:
            if text:
                p.help = _render(text)
            if is_flag(p):
                p.metavar = ""  # Typer shows the metavar, when set, instead of `<bool>`
        if command.help:
            command.help = _render(command.help)
        yield
    finally:
        for p, text, metavar in saved:
            p.help, p.metavar = text, metavar
        command.help = saved_help


class VopdCommand(TyperCommand):
    """A Typer command whose help shows every default and no placeholder after a flag, and sorts its options
    into the panels of `panels` (panel title -> parameter names; see `with_panels`)."""

    panels: Mapping[str, Sequence[str]] = {}

    def format_help(self, ctx: Any, formatter: Any) -> None:
        params = self.get_params(ctx)
        for p in params:
            if getattr(p, "rich_help_panel", None) is None:
                p.rich_help_panel = next((title for title, names in self.panels.items() if p.name in names), None)
        with _plain(self, params):
            super().format_help(ctx, formatter)


def with_panels(panels: Mapping[str, Sequence[str]]) -> type[VopdCommand]:
    """A VopdCommand class whose help groups the options by `panels`, in its order; an option that none names
    stays in the first panel, "Options" (tests/test_cli_help.py asks for every option to have a panel).
    Kept apart from the parameters so that adding an option touches one line here and its own definition."""
    return type("VopdPanelledCommand", (VopdCommand,), {"panels": dict(panels)})


class VopdGroup(TyperGroup):
    """The `vopd` group, with the same help rendering as its commands."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        commands = [c for name in self.list_commands(ctx) if (c := self.get_command(ctx, name)) is not None]
        with _plain(self, self.get_params(ctx)):
            saved = [(c, c.help) for c in commands]
            try:
                for c in commands:
                    if c.help:
                        c.help = _render(c.help)
                super().format_help(ctx, formatter)
            finally:
                for c, text in saved:
                    c.help = text
